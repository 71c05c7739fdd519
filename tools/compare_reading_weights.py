"""How the dae's reading_weights and reading_power (how its axial, coronal and sagittal readings are averaged into
the map) were chosen, on the VALIDATION subjects (never test subjects, never lesion cases).

    python tools/compare_reading_weights.py --data ../shared/data --cache /work/cache/uad --fit-subjects 40 \
        --no-mirror --powers 1 0.5 > Resources/reading-weights-validation.txt

Each direction's healthy map statistics and readings do not depend on the weights, so they are fitted once (on the
first ``--fit-subjects`` training subjects, for time) and each case is read once; every weighting and power is then
scored by the measure `uad train` records as ``auprc_final_map``: pooled AUPRC of the median-filtered map on two
synthetic anomalies per validation scan, drawn as it draws them (seed 0). ``--no-mirror`` reads each scan once
instead of twice with its mirror image (half the time; the weightings are compared, not the level). The chosen ones
are then fitted in full by `uad train --steps 0` (tools/reproduce_bundled.sh), which records the final figure in the
checkpoint.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from uad.calibration import validation_anomalies
from uad.checkpoint import load_checkpoint
from uad.inference import resolve_checkpoint_path
from uad.metrics import auprc
from uad.postprocessing import PostprocessConfig, median_filter
from uad.training import TrainConfig, load_cohort

SPACING = (2.0, 2.0, 2.0)  # the working grid's, where validation_anomalies draws by default

WEIGHTINGS = ((0.6, 0.2, 0.2), (0.2, 0.4, 0.4), (1 / 3, 1 / 3, 1 / 3), (0.45, 0.275, 0.275), (0.4, 0.3, 0.3),
              (0.4, 0.4, 0.2), (0.4, 0.2, 0.4), (0.3, 0.4, 0.3), (0.3, 0.3, 0.4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "uad"))
    parser.add_argument("--model", default="dae", help="bundled name or checkpoint path of a slice model")
    parser.add_argument("--fit-subjects", type=int, default=0, help="training subjects for the statistics (0: all)")
    parser.add_argument("--no-mirror", action="store_true", help="score without mirror averaging (half the time)")
    parser.add_argument("--powers", type=float, nargs="+", default=[1.0], help="reading_power values to score")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    checkpoint = load_checkpoint(resolve_checkpoint_path(args.model))
    model = checkpoint.model.eval()
    if tuple(getattr(model.config, "reading_directions", ())) != ("axial", "coronal", "sagittal"):
        parser.error(f"{args.model} does not read axial, coronal and sagittal slices: nothing to weigh")
    model.config = replace(model.config, mirror_averaging=model.config.mirror_averaging and not args.no_mirror)
    cohort = load_cohort(TrainConfig(model=model.config.name, data_dir=str(args.data / "healthy/ixi_t1"), out_dir="",
                                     cache_dir=args.cache), checkpoint.preprocessing)
    fitted = slice(None, args.fit_subjects or None)
    model.fit_map_statistics(cohort.train_images[fitted], cohort.train_masks[fitted])
    print(f"# {args.model}: statistics on {len(cohort.train_images[fitted])} training subjects, "
          f"mirror averaging {model.config.mirror_averaging}; validation AUPRC of the final map "
          f"({len(cohort.validation_images)} validation subjects x 2 synthetic anomalies)")
    # The anomalies of calibration.validation_auprc (what `uad train` records), each case read once.
    cases = [(model.read_directions(modified, mask), truth, mask)
             for modified, truth, mask in validation_anomalies(cohort.validation_images, cohort.validation_masks)]
    median_mm = PostprocessConfig(threshold=0.0).median_mm
    truths, masks = np.stack([truth for _, truth, _ in cases]), np.stack([mask for _, _, mask in cases])
    print("axial coronal sagittal power | validation AUPRC")
    for power in args.powers:
        for weights in WEIGHTINGS:
            model.config = replace(model.config, reading_weights=weights, reading_power=power)
            maps = np.stack([median_filter(model.combine_readings(readings).anomaly_map, mask, SPACING, median_mm)
                             for readings, _, mask in cases])
            score = auprc(maps, truths, mask=masks)
            print(f"{weights[0]:.3f} {weights[1]:.3f} {weights[2]:.3f} {power:g} | {score:.4f}", flush=True)


if __name__ == "__main__":
    main()
