"""Choose the fusion model's member weights and smoothing on the VALIDATION subjects (never test subjects, never
lesion cases).

    python tools/choose_fusion_weights.py --data ../shared/data --members dae patch-retrieval

Each member's z-scored map is computed once per case: two synthetic anomalies per validation subject (as the
training loop's validation score draws them), one stroke shape of at least 1 ml and two small ones (0.15 to 1 ml,
the size of most MS lesions: without them, smoothing that merely favours 20-30 mm boxes would look free). Every
(weight, smoothing) pair on a grid is scored by the mean of the three pooled AUPRCs of the median-filtered fused
map. Prints a table and the choice, to pass to ``uad train --model fusion --option 'weights=[...]' --option
'smoothing_sigma_voxels=...'``.
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
from uad.models.fusion import FusionConfig, fuse_maps
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
        for _ in range(2):
            modified, truth, _ = add_stroke_lesion(image, mask, stroke_rng, shapes, min_volume_ml=0.15,
                                                   max_volume_ml=1.0)
            yield "small stroke", modified, truth, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--members", nargs=2, default=["dae", "patch-retrieval"])
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "uad"))
    parser.add_argument("--grid", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0],
                        help="Gaussian smoothing of the fused map, in working-grid voxels")
    args = parser.parse_args()
    members = [load_checkpoint(resolve_checkpoint_path(name)).model for name in args.members]
    cases = [(protocol, [m.predict(image, mask).anomaly_map for m in members], truth, mask)
             for protocol, image, truth, mask in validation_cases(args.data, args.cache)]
    scores = {}
    for sigma in args.sigmas:
        for weight in args.grid:  # weight of the first member; the second gets 1 - weight
            config = FusionConfig(members=tuple(args.members), weights=(weight, round(1 - weight, 4)),
                                  smoothing_sigma_voxels=sigma)
            pooled = {}
            for protocol, maps, truth, mask in cases:
                fused = median_filter(fuse_maps(maps, mask, config), mask, SPACING, 5.0)
                pooled.setdefault(protocol, ([], []))
                pooled[protocol][0].append(fused[mask])
                pooled[protocol][1].append(truth[mask])
            score = {p: auprc(np.concatenate(s), np.concatenate(t)) for p, (s, t) in pooled.items()}
            score["mean"] = float(np.mean(list(score.values())))
            scores[(weight, sigma)] = score
            print(f"weight {weight:.2f} on {args.members[0]}, sigma {sigma:.2f}: " +
                  ", ".join(f"{k} {v:.4f}" for k, v in score.items()), flush=True)
    weight, sigma = max(scores, key=lambda key: scores[key]["mean"])
    print(json.dumps({"members": args.members, "weights": [weight, round(1 - weight, 4)],
                      "smoothing_sigma_voxels": sigma, "validation": scores[(weight, sigma)]}))


if __name__ == "__main__":
    main()
