"""How patch-retrieval's coarse search was chosen: its grid, patch, radius and weight, on the VALIDATION cases of
tools/choose_fusion_weights.py (never test subjects, never lesion cases).

    python tools/compare_patch_scales.py --data ../shared/data > Resources/patch-scales-validation.txt

Every setting's coarse map gets its own healthy statistics, leave-one-out over the training scans as `uad train`
fits them; the fine map is the bundled model's. The map at coarse weight w is (1 - w) fine + w coarse, as the model
computes it. Each row scores it alone (5 mm median filter, as patch-retrieval segments) and fused 0.5/0.5 with the
bundled dae (smoothing 0.5 voxels, no median filter: the fusion chosen before the coarse search existed), by the
score of choose_fusion_weights.py: the mean over the kinds of case of pooled AUPRC and of Dice at 1 % healthy FPR.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

# One registration thread, as in `uad evaluate`: multi-threaded metric sums vary in order, and the volumes with them.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

from choose_fusion_weights import SPACING, score, training_volumes, validation_cases

from uad.checkpoint import load_checkpoint
from uad.inference import resolve_checkpoint_path
from uad.models import build_model
from uad.models.fusion import FusionConfig, fuse_maps
from uad.postprocessing import PostprocessConfig, median_filter

SETTINGS = [(2, 3, 1), (2, 5, 1), (2, 3, 2), (2, 5, 2), (2, 7, 2), (4, 3, 1)]  # (factor, patch, radius), coarse voxels
WEIGHTS = [0.0, 0.25, 0.5, 0.75, 1.0]


def with_coarse_setting(bundled, factor: int, patch: int, radius: int, volumes: np.ndarray, masks: np.ndarray):
    """The bundled patch-retrieval model with this coarse setting, its coarse statistics fitted."""
    model = build_model(replace(bundled.config, coarse_weight=0.5, coarse_factor=factor, coarse_patch_size=patch,
                                coarse_search_radius=radius))
    # The coarse buffers' shape depends on the setting: keep the new model's, take everything else from the bundle.
    fresh = {k: v for k, v in model.state_dict().items() if k.startswith("coarse_")}
    model.load_state_dict({k: v for k, v in bundled.state_dict().items() if not k.startswith("coarse_")} | fresh)
    model.fit_coarse_statistics(volumes, masks)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "uad"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    bundled = load_checkpoint(resolve_checkpoint_path("patch-retrieval"))
    volumes, masks = training_volumes(args.data, args.cache, bundled.preprocessing)

    fine_only = build_model(replace(bundled.model.config, coarse_weight=0.0))
    fine_only.load_state_dict(bundled.model.state_dict())
    dae = load_checkpoint(resolve_checkpoint_path("dae")).model
    cases = [(kind, image, fine_only.predict(image, mask).anomaly_map, dae.predict(image, mask).anomaly_map, truth,
              mask) for kind, image, truth, mask in validation_cases(args.data, args.cache)]
    alone_post = PostprocessConfig(threshold=0.0, median_mm=5.0)
    fused_post = PostprocessConfig(threshold=0.0, median_mm=0.0)
    fusion = FusionConfig(weights=(0.5, 0.5), smoothing_sigma_voxels=0.5)
    print("factor patch radius weight | patch-retrieval alone: mean, AUPRC synthetic | fused with dae: mean, AUPRC "
          "synthetic, AUPRC stroke, Dice many small")
    for factor, patch, radius in SETTINGS:
        model = with_coarse_setting(bundled.model, factor, patch, radius, volumes, masks)
        coarse = [model.coarse_map(image, mask) for _, image, _, _, _, mask in cases]
        for weight in WEIGHTS:
            maps = [(1 - weight) * fine + weight * c for (_, _, fine, _, _, _), c in zip(cases, coarse)]
            alone = score([(kind, median_filter(m, mask, SPACING, 5.0), truth, mask)
                           for (kind, _, _, _, truth, mask), m in zip(cases, maps)], alone_post, 0.01)
            fused = score([(kind, fuse_maps([d, m], mask, fusion), truth, mask)
                           for (kind, _, _, d, truth, mask), m in zip(cases, maps)], fused_post, 0.01)
            print(f"{factor} {patch} {radius} {weight:.2f} | {alone['mean']:.4f} {alone['auprc synthetic']:.4f} | "
                  f"{fused['mean']:.4f} {fused['auprc synthetic']:.4f} {fused['auprc stroke']:.4f} "
                  f"{fused['dice many small']:.4f}", flush=True)


if __name__ == "__main__":
    main()
