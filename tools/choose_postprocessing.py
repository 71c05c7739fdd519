"""Choose a model's segmentation steps (brain erosion, smallest component, top-K; Atropos refinement on request) on
the VALIDATION subjects, never test subjects or lesion cases:

    python tools/choose_postprocessing.py --data ../shared/data --model fusion \
        --predictions /work/cache/uad/validation-predictions > Resources/postprocessing-validation.txt

The model's map of each validation case of tools/choose_fusion_weights.py (synthetic anomalies, one stroke shape,
two small ones, a scan with 8 to 24 small ones at once, a scan with 10 to 30 faint MS-like ones, the clean scan) is
computed once. Every setting on the grid gets its threshold from the clean scans at the model's false-positive rate
(only the erosion moves it: the rate is counted inside the eroded brain) and is scored by the mean, over the kinds of
lesion case, of the mean Dice; the volume it flags on the clean scans is printed beside it. The choice is the best
mean Dice among the settings that flag no more on the clean scans than the model's current ones and lose no more than
``MAX_KIND_LOSS`` (0.01) Dice on any kind of case:
- a setting that finds more by flagging more would spend the healthy-volume budget that another site's scans need
  (EVALUATION.md: at most 15 ml on MASS);
- three of the kinds hold one lesion, so the mean alone rewards keeping fewer components (top-K 5 won it on the
  first run, at 0.10 Dice less on the scans with many small lesions): a setting must not trade one kind of patient
  for another.

Resources/postprocessing-validation.txt is the bundled fusion's run on all five kinds (2026-12-07, ~5 min with
``--predictions``): its settings stay. Erosion 4 mm, smallest component 16 mm3, top-K 10 would score a higher mean
Dice (0.374 against 0.366) and flag less on the clean scans, but loses 0.011 of the stroke shapes' Dice.

All of this is on the 2 mm working grid, where `uad detect` segments on the scan's own grid (usually 1 mm): a
dilation of 1 mm is no voxel here, so dilation is not searched.

Atropos refinement (``--refines none atropos``, Ano-swinMAE's last step) can be scored too, and is not to be
trusted from these cases alone: a painted lesion is one uniform intensity, which Atropos separates from its
surroundings at once, and a real lesion is not. In Resources/postprocessing-refine-validation.txt (2026-12-07, ~8 min)
it raises the fusion's mean Dice from 0.366 to 0.386, but flags 8.7 ml on the clean scans against 5.1 and costs small
stroke shapes 0.05, so it is not chosen. A variant of the rule that only trims components (never grows them; not
committed) passed the choice: mean Dice 0.425 with components from 16 mm3, 3.4 ml on clean scans. On the two real T1
lesion scans, though, `uad detect` with it lowered the Dice, MS 0.258 -> 0.211 and glioma 0.313 -> 0.141 (the
committed rule: 0.195 and 0.183), so detect's default stays unrefined.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from choose_fusion_weights import MAX_KIND_LOSS, SPACING, calibrated_dice, validation_cases

from uad.checkpoint import load_checkpoint
from uad.evaluation import Variant
from uad.inference import resolve_checkpoint_path
from uad.options import REFINE_METHODS
from uad.postprocessing import median_filter


def score(cases, images, post, fpr: float) -> dict:
    """Mean Dice per kind of case at the threshold calibrated at ``fpr`` on the clean scans, their mean, and the
    mean volume flagged on the clean scans; ``cases`` holds (kind, filtered map, truth, brain), ``images`` the scans."""
    result, threshold, healthy_ml = calibrated_dice(cases, post, fpr, images)
    result["mean dice"] = float(np.mean(list(result.values())))
    result["healthy ml"] = healthy_ml
    result["threshold"] = threshold
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="fusion", help="bundled model name or checkpoint path")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "uad"))
    parser.add_argument("--erosions", type=float, nargs="+", default=[2.0, 4.0], help="brain erosion, mm")
    parser.add_argument("--min-components", type=float, nargs="+", default=[16.0, 50.0, 100.0],
                        help="smallest component kept, mm3")
    parser.add_argument("--top-ks", type=int, nargs="+", default=[5, 10, 20, 0], help="components kept, 0 = all")
    parser.add_argument("--refines", nargs="+", choices=REFINE_METHODS, default=["none"],
                        help="boundary refinements to try, e.g. none atropos (Atropos: about 2 min a setting)")
    parser.add_argument("--predictions", default=None,
                        help="folder where a fusion's members' predictions are kept (as for choose_fusion_weights.py)")
    args = parser.parse_args()
    path = resolve_checkpoint_path(args.model)
    checkpoint = load_checkpoint(path)
    current = checkpoint.calibrated_postprocessing(None, "sliding")
    fpr = checkpoint.calibration["fpr"]
    model = Variant(checkpoint, path, None, predictions_dir=args.predictions)  # predicts as `uad evaluate` does
    cases, images = [], []
    for kind, image, truth, mask in validation_cases(args.data, args.cache):
        filtered = median_filter(model.predict(image, mask).anomaly_map, mask, SPACING, current.median_mm)
        cases.append((kind, filtered, truth, mask))
        images.append(image)
    current_key = (current.brain_erosion_mm, current.min_component_mm3, current.top_k, current.refine)
    scores = {}
    for key in [*itertools.product(args.erosions, args.min_components, args.top_ks, args.refines), current_key]:
        if key not in scores:
            post = replace(current, brain_erosion_mm=key[0], min_component_mm3=key[1], top_k=key[2], refine=key[3])
            scores[key] = score(cases, images, post, fpr)
            print(f"erosion {key[0]:g} mm, smallest {key[1]:g} mm3, top-K {key[2]}, refine {key[3]}"
                  f"{' (current)' if key == current_key else ''}: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in scores[key].items()), flush=True)
    now = scores[current_key]
    dice_kinds = [name for name in now if name.startswith("dice ")]
    allowed = [key for key in scores if scores[key]["healthy ml"] <= now["healthy ml"] + 1e-9
               and all(scores[key][name] >= now[name] - MAX_KIND_LOSS for name in dice_kinds)]
    best = max(allowed, key=lambda key: scores[key]["mean dice"])  # the current settings always qualify
    print(json.dumps({"model": args.model, "brain_erosion_mm": best[0], "min_component_mm3": best[1],
                      "top_k": best[2], "refine": best[3], "validation": scores[best]}))


if __name__ == "__main__":
    main()
