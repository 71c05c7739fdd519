"""Is one fusion weighting, or one dae, better than another beyond the noise of the validation subjects? A paired
bootstrap.

    python tools/compare_fusion_weights.py --data ../shared/data --incumbent 0.7 0.3 1.0 --candidate 0.8 0.3 1.0 \
        --predictions /work/cache/uad/validation-predictions > Resources/fusion-weights-paired.txt

With ``--candidate-dae runs/X/model.pt`` the candidate fuses that dae checkpoint instead of the bundled one (the same
weights for both: a retrained dae is judged by what it brings to the default model).

tools/choose_fusion_weights.py ranks a grid by one score on 15 validation subjects; neighbouring weightings differ by
a few thousandths. Here both weightings (the dae's weight at each intensity anchor, 0.2 / 0.5 / 0.8 by default) get
the chooser's cases, threshold and score; then the subjects are resampled with replacement and the score difference
(candidate minus incumbent) recomputed on the same resamples, thresholds held at their full-sample values. A bundled
weighting is replaced only when that difference's 95 % interval lies above 0.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
from choose_fusion_weights import CASES_PER_SUBJECT, SPACING, member_maps, validation_cases

from uad.calibration import healthy_threshold
from uad.checkpoint import load_checkpoint
from uad.inference import resolve_checkpoint_path
from uad.metrics import auprc, dice
from uad.models.fusion import FusionConfig, fuse_maps
from uad.postprocessing import PostprocessConfig, segment_filtered


def scored_cases(cases, anchors: tuple[float, ...], dae_weights: tuple[float, ...], fpr: float,
                 members: int) -> list[tuple]:
    """(kind, subject, Dice at the calibrated threshold, brain scores, brain labels) of every lesion case, fusing the
    maps of the ``members``-th pair of checkpoints (0: the bundled pair, 1: the candidate's)."""
    config = FusionConfig(members=("dae", "patch-retrieval"), intensity_anchors=anchors,
                          anchor_weights=tuple((w, round(1 - w, 4)) for w in dae_weights))
    fused = [(kind, subject, fuse_maps(maps[members], mask, config, image), truth, mask)
             for kind, subject, maps, truth, mask, image in cases]
    healthy = [(f, mask) for kind, _, f, _, mask in fused if kind == "healthy"]
    post = PostprocessConfig(threshold=0.0, median_mm=0.0)
    threshold, _ = healthy_threshold(*zip(*healthy), post, fpr, SPACING)
    post = replace(post, threshold=threshold)
    return [(kind, subject, dice(segment_filtered(f, mask, SPACING, post), truth), f[mask > 0], truth[mask > 0])
            for kind, subject, f, truth, mask in fused if kind != "healthy"]


def score(scored, subjects) -> float:
    """The chooser's score on a list of subjects (repeats count again): the mean, over the kinds of case, of the
    pooled AUPRC and of the mean Dice."""
    by_subject = {}
    for case in scored:
        by_subject.setdefault(case[1], []).append(case)
    values = []
    for kind in sorted({case[0] for case in scored}):
        chosen = [case for subject in subjects for case in by_subject[subject] if case[0] == kind]
        values.append(auprc(np.concatenate([c[3] for c in chosen]), np.concatenate([c[4] for c in chosen])))
        values.append(float(np.mean([c[2] for c in chosen])))
    return float(np.mean(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "uad"))
    parser.add_argument("--anchors", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    parser.add_argument("--incumbent", type=float, nargs="+", required=True, help="the dae's weight at each anchor")
    parser.add_argument("--candidate", type=float, nargs="+", required=True, help="the dae's weight at each anchor")
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--resamples", type=int, default=100)
    parser.add_argument("--candidate-dae", default="dae", help="the candidate's dae checkpoint (default: the bundled)")
    parser.add_argument("--predictions", default=None, help="as for tools/choose_fusion_weights.py")
    args = parser.parse_args()
    if not len(args.incumbent) == len(args.candidate) == len(args.anchors):
        parser.error("--incumbent and --candidate need one weight per --anchors value")
    retrieval = load_checkpoint(resolve_checkpoint_path("patch-retrieval"))
    pairs = [[load_checkpoint(resolve_checkpoint_path(dae)), retrieval] for dae in ("dae", args.candidate_dae)]
    # validation_cases yields each kind's cases subject by subject, in the same subject order for every kind: count
    # each kind to know whose case it is.
    seen: dict[str, int] = {}
    cases = []
    for kind, image, truth, mask in validation_cases(args.data, args.cache):
        subject = seen.get(kind, 0) // CASES_PER_SUBJECT.get(kind, 1)
        seen[kind] = seen.get(kind, 0) + 1
        maps = [member_maps(pair, image, mask, args.predictions) for pair in pairs]
        cases.append((kind, subject, maps, truth, mask, image))
    anchors = tuple(args.anchors)
    incumbent = scored_cases(cases, anchors, tuple(args.incumbent), args.fpr, members=0)
    candidate = scored_cases(cases, anchors, tuple(args.candidate), args.fpr, members=1)
    subjects = sorted({case[1] for case in incumbent})
    print(f"incumbent {args.incumbent}: score {score(incumbent, subjects):.4f}")
    print(f"candidate {args.candidate} with {args.candidate_dae}: score {score(candidate, subjects):.4f}")
    rng = np.random.default_rng(0)
    differences = []
    for _ in range(args.resamples):
        drawn = list(rng.choice(subjects, size=len(subjects)))
        differences.append(score(candidate, drawn) - score(incumbent, drawn))
    low, high = np.percentile(differences, [2.5, 97.5])
    verdict = "replace the incumbent" if low > 0 else "keep the incumbent"
    print(f"candidate - incumbent over {args.resamples} resamples of {len(subjects)} validation subjects: "
          f"{np.mean(differences):+.4f} [{low:+.4f}, {high:+.4f}], above 0 in {np.mean(np.array(differences) > 0):.0%}"
          f": {verdict}")


if __name__ == "__main__":
    main()
