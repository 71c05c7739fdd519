"""Is one fusion weighting, or one set of members, better than another beyond the noise of the validation subjects?
A paired bootstrap.

    python tools/compare_fusion_weights.py --data ../shared/data --incumbent 0.7 0.3 1.0 --candidate 0.8 0.3 1.0 \
        --predictions /work/cache/uad/validation-predictions > Resources/fusion-weights-paired.txt

Each side fuses its own members (``--incumbent-members``, ``--candidate-members``: bundled names or checkpoint paths,
dae and patch retrieval by default): ``--candidate-members runs/X/model.pt patch-retrieval`` judges a retrained dae by
what it brings to the default model, ``--candidate-members dae patch-retrieval rae --candidate-split 0.5,0.5`` a third
member that takes half of what the dae leaves.

tools/choose_fusion_weights.py ranks a grid by one score on 15 validation subjects; neighbouring weightings differ by
a few thousandths. Here both sides (the first member's weight at each intensity anchor, 0.2 / 0.5 / 0.8 by default,
the others sharing the rest) get the chooser's cases, threshold and score; then the subjects are resampled with
replacement and the score difference (candidate minus incumbent) recomputed on the same resamples, thresholds held at
their full-sample values. A bundled weighting is replaced only when that difference's 95 % interval lies above 0 and
no kind of case loses more than ``MAX_KIND_LOSS`` of its AUPRC or Dice.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
from choose_fusion_weights import (
    CASES_PER_SUBJECT,
    MAX_KIND_LOSS,
    SPACING,
    member_maps,
    member_row,
    parse_split,
    validation_cases,
)

from uad.calibration import healthy_threshold
from uad.checkpoint import load_checkpoint
from uad.inference import resolve_checkpoint_path
from uad.metrics import dice
from uad.models.fusion import FusionConfig, fuse_maps
from uad.postprocessing import PostprocessConfig, segment_filtered


def scored_cases(cases, config: FusionConfig, fpr: float, side: int) -> list[tuple]:
    """(kind, subject, Dice at the calibrated threshold, brain scores, brain labels) of every lesion case, fusing by
    ``config`` the maps of one side's members (0: the incumbent's, 1: the candidate's)."""
    fused = [(kind, subject, fuse_maps(maps[side], mask, config, image), truth, mask)
             for kind, subject, maps, truth, mask, image in cases]
    healthy = [(f, mask) for kind, _, f, _, mask in fused if kind == "healthy"]
    post = PostprocessConfig(threshold=0.0, median_mm=0.0)
    threshold, _ = healthy_threshold(*zip(*healthy), post, fpr, SPACING)
    post = replace(post, threshold=threshold)
    return [(kind, subject, dice(segment_filtered(f, mask, SPACING, post), truth), f[mask > 0], truth[mask > 0])
            for kind, subject, f, truth, mask in fused if kind != "healthy"]


def anchored_config(members: list[str], anchors: tuple[float, ...], first_weights: list[float],
                    split: str | None) -> FusionConfig:
    """The fusion of ``members`` whose first member weighs ``first_weights`` at the anchors, the others sharing the
    rest by ``split`` (comma-separated; default equal shares)."""
    if len(members) < 2:
        raise ValueError(f"{members}: a fusion needs two or more members")
    shares = parse_split(split, len(members) - 1)
    if len(shares) != len(members) - 1:
        raise ValueError(f"{members}: a split needs {len(members) - 1} shares, got {split}")
    # ``weights`` is unused where anchors are given; as in the chooser, it holds the anchors' mean.
    return FusionConfig(members=tuple(members), weights=member_row(round(float(np.mean(first_weights)), 4), shares),
                        intensity_anchors=anchors,
                        anchor_weights=tuple(member_row(w, shares) for w in first_weights))


class PooledCases:
    """One side's scored cases, ready to be scored for any draw of subjects (a subject drawn twice counts twice): the
    chooser's score is the mean, over the kinds of case, of the pooled AUPRC and of the mean Dice. Each kind's voxels
    are pooled and sorted once; a draw only weighs them by how often their subject was drawn, which gives the AUPRC of
    the repeated voxels exactly (uad.metrics.auprc) without sorting millions of voxels again for every resample."""

    def __init__(self, scored):
        self.subjects = sorted({case[1] for case in scored})
        index = {subject: i for i, subject in enumerate(self.subjects)}
        self.kinds = {}
        for kind in sorted({case[0] for case in scored}):
            cases = [case for case in scored if case[0] == kind]
            scores = np.concatenate([c[3] for c in cases])
            order = np.argsort(scores, kind="stable")[::-1]
            descending = scores[order]
            self.kinds[kind] = {
                "labels": np.concatenate([c[4] for c in cases]).astype(np.float64)[order],
                "owners": np.concatenate([np.full(len(c[3]), index[c[1]]) for c in cases])[order],
                "last_of_value": np.flatnonzero(np.r_[descending[1:] != descending[:-1], True]),
                "dice_owners": np.array([index[c[1]] for c in cases]),
                "dices": np.array([c[2] for c in cases]),
            }

    def kind_scores(self, subjects) -> dict[str, float]:
        """{"auprc <kind>": pooled AUPRC, "dice <kind>": mean Dice} over the cases of a list of subjects."""
        drawn = np.bincount([self.subjects.index(s) for s in subjects], minlength=len(self.subjects))
        values = {}
        for kind, pooled in self.kinds.items():
            weights = drawn[pooled["owners"]]
            true_positives = np.cumsum(weights * pooled["labels"])[pooled["last_of_value"]]
            predicted = np.cumsum(weights)[pooled["last_of_value"]].astype(np.float64)
            # Values held only by subjects not drawn add no recall, and before the first drawn one nothing is predicted.
            precision = np.divide(true_positives, predicted, out=np.zeros_like(predicted), where=predicted > 0)
            recall_gain = np.diff(true_positives, prepend=0) / true_positives[-1]
            values[f"auprc {kind}"] = float(np.sum(recall_gain * precision))
            case_weights = drawn[pooled["dice_owners"]]
            values[f"dice {kind}"] = float(np.sum(case_weights * pooled["dices"]) / np.sum(case_weights))
        return values

    def score(self, subjects) -> float:
        return float(np.mean(list(self.kind_scores(subjects).values())))


def verdict(interval_low: float, by_kind: dict[str, float]) -> str:
    """Replace the incumbent only when the score's interval lies above 0 and no kind of case pays for it."""
    traded = [name for name, difference in by_kind.items() if difference < -MAX_KIND_LOSS]
    if interval_low <= 0:
        return "keep the incumbent"
    if traded:
        return f"keep the incumbent: {', '.join(traded)} fall by more than {MAX_KIND_LOSS}"
    return "replace the incumbent"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "uad"))
    parser.add_argument("--anchors", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    parser.add_argument("--incumbent", type=float, nargs="+", required=True,
                        help="the first member's weight at each anchor")
    parser.add_argument("--candidate", type=float, nargs="+", required=True,
                        help="the first member's weight at each anchor")
    parser.add_argument("--incumbent-members", nargs="+", default=["dae", "patch-retrieval"],
                        help="bundled model names or checkpoint paths")
    parser.add_argument("--candidate-members", nargs="+", default=["dae", "patch-retrieval"],
                        help="bundled model names or checkpoint paths")
    parser.add_argument("--incumbent-split", default=None,
                        help="how the other members share what the first leaves, e.g. 0.5,0.5 (default: equally)")
    parser.add_argument("--candidate-split", default=None, help="as --incumbent-split")
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--resamples", type=int, default=100)
    parser.add_argument("--predictions", default=None, help="as for tools/choose_fusion_weights.py")
    args = parser.parse_args()
    if not len(args.incumbent) == len(args.candidate) == len(args.anchors):
        parser.error("--incumbent and --candidate need one weight per --anchors value")
    anchors = tuple(args.anchors)
    try:
        configs = [anchored_config(args.incumbent_members, anchors, args.incumbent, args.incumbent_split),
                   anchored_config(args.candidate_members, anchors, args.candidate, args.candidate_split)]
    except ValueError as error:
        parser.error(str(error))
    sides = [[load_checkpoint(resolve_checkpoint_path(name)) for name in members]
             for members in (args.incumbent_members, args.candidate_members)]
    # validation_cases yields each kind's cases subject by subject, in the same subject order for every kind: count
    # each kind to know whose case it is.
    seen: dict[str, int] = {}
    cases = []
    for kind, image, truth, mask in validation_cases(args.data, args.cache):
        subject = seen.get(kind, 0) // CASES_PER_SUBJECT.get(kind, 1)
        seen[kind] = seen.get(kind, 0) + 1
        maps = [member_maps(members, image, mask, args.predictions) for members in sides]
        cases.append((kind, subject, maps, truth, mask, image))
    incumbent = PooledCases(scored_cases(cases, configs[0], args.fpr, side=0))
    candidate = PooledCases(scored_cases(cases, configs[1], args.fpr, side=1))
    subjects = incumbent.subjects
    for label, config, pooled in (("incumbent", configs[0], incumbent), ("candidate", configs[1], candidate)):
        rows = " / ".join(",".join(f"{w:g}" for w in row) for row in config.anchor_weights)
        print(f"{label} {' + '.join(config.members)} at {rows}: score {pooled.score(subjects):.4f}")
    by_kind = {name: value - incumbent.kind_scores(subjects)[name]
               for name, value in candidate.kind_scores(subjects).items()}
    print("candidate - incumbent per kind: " + ", ".join(f"{name} {value:+.4f}" for name, value in by_kind.items()))
    rng = np.random.default_rng(0)
    differences = []
    for _ in range(args.resamples):
        drawn = list(rng.choice(subjects, size=len(subjects)))
        differences.append(candidate.score(drawn) - incumbent.score(drawn))
    low, high = np.percentile(differences, [2.5, 97.5])
    print(f"candidate - incumbent over {args.resamples} resamples of {len(subjects)} validation subjects: "
          f"{np.mean(differences):+.4f} [{low:+.4f}, {high:+.4f}], above 0 in {np.mean(np.array(differences) > 0):.0%}"
          f": {verdict(low, by_kind)}")


if __name__ == "__main__":
    main()
