"""Choose the fusion model's member weights on the VALIDATION subjects (never test subjects, never lesion cases).

    python tools/choose_fusion_weights.py --data ../shared/data --members dae patch-retrieval

Each member's z-scored map is computed once per case (two synthetic anomalies per validation subject, as the
training loop's validation score draws them, and one stroke shape per subject), then every weight on a grid is
scored by the mean of the two pooled AUPRCs of the median-filtered fused map. Prints a table and the chosen
weights, to pass to ``uad train --model fusion --option 'weights=[...]'``.
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import numpy as np

from uad.calibration import SYNTHETIC_VALIDATION_SEED_OFFSET
from uad.checkpoint import load_checkpoint
from uad.data import find_subjects, load_cached, prepare_cohort, split_subjects
from uad.inference import resolve_checkpoint_path
from uad.lesion_shapes import add_stroke_lesion, lesion_shape_files
from uad.metrics import auprc
from uad.postprocessing import median_filter
from uad.synthetic import add_synthetic_anomaly

SPACING = (2.0, 2.0, 2.0)


def validation_cases(data: Path, cache: str, seed: int = 0):
    """(protocol, image, truth, brain) for every validation case, drawn reproducibly."""
    subjects = find_subjects(data / "healthy/ixi_t1")
    split = split_subjects([s.subject_id for s in subjects])
    checkpoint = load_checkpoint(resolve_checkpoint_path("intensity"))  # any bundled model: the same preprocessing
    cached = prepare_cohort([s for s in subjects if s.subject_id in split.validation], checkpoint.preprocessing,
                            cache)
    volumes = [load_cached(cached[i]) for i in split.validation]
    rng = np.random.default_rng(seed + SYNTHETIC_VALIDATION_SEED_OFFSET)
    for image, mask in volumes:
        for _ in range(2):
            modified, truth = add_synthetic_anomaly(image, mask, rng, spacing_mm=SPACING[0])
            yield "synthetic", modified, truth, mask
    shapes = lesion_shape_files(data / "lesion_shapes/soop_stroke_mni")
    for subject_id, (image, mask) in zip(split.validation, volumes):
        stroke_rng = np.random.default_rng([seed, 7, zlib.crc32(subject_id.encode())])
        modified, truth, _ = add_stroke_lesion(image, mask, stroke_rng, shapes)
        yield "stroke", modified, truth, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--members", nargs=2, default=["dae", "patch-retrieval"])
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "uad"))
    parser.add_argument("--grid", type=float, nargs="+", default=[0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 1.0])
    args = parser.parse_args()
    members = [load_checkpoint(resolve_checkpoint_path(name)).model for name in args.members]
    cases = [(protocol, [m.predict(image, mask).anomaly_map for m in members], truth, mask)
             for protocol, image, truth, mask in validation_cases(args.data, args.cache)]
    scores = {}
    for weight in args.grid:  # weight of the first member; the second gets 1 - weight
        pooled = {}
        for protocol, maps, truth, mask in cases:
            fused = median_filter(weight * maps[0] + (1 - weight) * maps[1], mask, SPACING, 5.0)
            pooled.setdefault(protocol, ([], []))
            pooled[protocol][0].append(fused[mask])
            pooled[protocol][1].append(truth[mask])
        scores[weight] = {p: auprc(np.concatenate(s), np.concatenate(t)) for p, (s, t) in pooled.items()}
        scores[weight]["mean"] = float(np.mean(list(scores[weight].values())))
        print(f"weight {weight:.2f} on {args.members[0]}: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                                         scores[weight].items()), flush=True)
    best = max(scores, key=lambda w: scores[w]["mean"])
    print(json.dumps({"members": args.members, "weights": [best, round(1 - best, 4)], "validation": scores[best]}))


if __name__ == "__main__":
    main()
