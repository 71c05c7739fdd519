"""How the dae's reading_weights (its axial, coronal and sagittal readings' shares of the map) were chosen, on the
VALIDATION subjects (never test subjects, never lesion cases).

    python tools/compare_reading_weights.py --data ../shared/data --cache /work/cache/uad --fit-subjects 40 \
        --no-mirror > Resources/reading-weights-validation.txt

Each direction's healthy map statistics do not depend on the weights, so they are fitted once (on the first
``--fit-subjects`` training subjects, for time); every weighting is then scored by the measure `uad train` records as
``auprc_final_map``: pooled AUPRC of the median-filtered map on two synthetic anomalies per validation scan (fixed
seed). ``--no-mirror`` reads each scan once instead of twice with its mirror image (half the time; the weights are
compared, not the level). The chosen weights are then fitted in full by `uad train --steps 0`
(tools/reproduce_bundled.sh), which records the final figure in the checkpoint.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import torch

from uad.calibration import validation_auprc
from uad.checkpoint import load_checkpoint
from uad.inference import resolve_checkpoint_path
from uad.training import TrainConfig, load_cohort

WEIGHTINGS = ((0.6, 0.2, 0.2), (0.2, 0.4, 0.4), (1 / 3, 1 / 3, 1 / 3), (0.45, 0.275, 0.275), (0.4, 0.3, 0.3),
              (0.4, 0.4, 0.2), (0.4, 0.2, 0.4), (0.3, 0.4, 0.3), (0.3, 0.3, 0.4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "uad"))
    parser.add_argument("--model", default="dae", help="bundled name or checkpoint path of a slice model")
    parser.add_argument("--fit-subjects", type=int, default=0, help="training subjects for the statistics (0: all)")
    parser.add_argument("--no-mirror", action="store_true", help="score without mirror averaging (half the time)")
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
    print("axial coronal sagittal | validation AUPRC")
    for weights in WEIGHTINGS:
        model.config = replace(model.config, reading_weights=weights)
        auprc = validation_auprc(model, cohort.validation_images, cohort.validation_masks, seed=0)
        print(f"{weights[0]:.3f} {weights[1]:.3f} {weights[2]:.3f} | {auprc:.4f}", flush=True)


if __name__ == "__main__":
    main()
