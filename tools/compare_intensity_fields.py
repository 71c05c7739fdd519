"""How patch-retrieval's ``intensity_field_degree`` was chosen, on the VALIDATION cases of
tools/choose_fusion_weights.py (never test subjects, never lesion cases), as they are and moved to other sites.

    python tools/compare_intensity_fields.py --data ../shared/data > Resources/intensity-fields-validation.txt

Retrieval compares raw intensities with the stored healthy IXI scans, so a scan from another site whose brain N4 left
darker in places finds no healthy match there. IXI validation scans do not show this, so each validation case is
scored twice: as it is, and multiplied by the intensity field of one of the healthy other-site (MASS) scans. That
field is measured without a polynomial (which would favour the correction being chosen): the ratio of the MASS scan
to the mean healthy IXI brain, both smoothed over tissue with a 20 mm Gaussian. The threshold stays the one
calibrated on the clean healthy validation scans, as a deployed model's does. Each degree's patch-retrieval is
refitted as `uad train --model patch-retrieval --option intensity_field_degree=N` fits it, and scored alone and
fused with the bundled dae at the bundled fusion's weights, by the score of choose_fusion_weights.py (the mean over
the kinds of case of pooled AUPRC and of Dice at 1 % healthy FPR). The shifted healthy scans' flagged volume is
reported too: what a clean scan from the other site would show.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

# One registration thread, as in `uad evaluate`: multi-threaded metric sums vary in order, and the volumes with them.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

from choose_fusion_weights import SPACING, score, training_volumes, validation_cases

from uad.checkpoint import load_checkpoint
from uad.data import find_subjects, load_cached, prepare_cohort
from uad.inference import resolve_checkpoint_path
from uad.models import build_model
from uad.models.fusion import fuse_maps
from uad.postprocessing import PostprocessConfig, segment_filtered

SITE_FIELD_SIGMA_VOXELS = 10.0  # 20 mm: the field's scale, far above any anatomy or lesion shape here


def site_fields(data: Path, cache: str, preprocessing, healthy_mean: np.ndarray) -> list[np.ndarray]:
    """The low-frequency intensity field of every healthy MASS scan against the mean healthy IXI brain."""
    subjects = find_subjects(data / "healthy/mass_t1")
    cached = prepare_cohort(subjects, preprocessing, cache, skull_stripped=True)
    fields = []
    for image, mask in (load_cached(path) for _, path in sorted(cached.items())):
        tissue = (mask & (healthy_mean > 0.35)).astype(np.float32)
        fields.append(ndimage.gaussian_filter(image * tissue, SITE_FIELD_SIGMA_VOXELS)
                      / np.maximum(ndimage.gaussian_filter(healthy_mean * tissue, SITE_FIELD_SIGMA_VOXELS), 1e-3))
    return fields


def refitted(bundled, degree: int, volumes: np.ndarray, masks: np.ndarray):
    """The bundled patch-retrieval's stored scans with this degree, its healthy statistics fitted anew."""
    model = build_model(replace(bundled.config, intensity_field_degree=degree))
    model.load_state_dict(bundled.state_dict())
    model.fit_map_statistics(volumes, masks)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "uad"))
    parser.add_argument("--degrees", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    bundled = load_checkpoint(resolve_checkpoint_path("patch-retrieval"))
    fusion = load_checkpoint(resolve_checkpoint_path("fusion")).model.config
    dae = load_checkpoint(resolve_checkpoint_path("dae")).model
    volumes, masks = training_volumes(args.data, args.cache, bundled.preprocessing)
    fields = site_fields(args.data, args.cache, bundled.preprocessing, bundled.model.atlas["healthy_mean"])
    clean = list(validation_cases(args.data, args.cache))
    shifted = [(kind, np.clip(image * fields[number % len(fields)], 0, None) * mask, truth, mask)
               for number, (kind, image, truth, mask) in enumerate(clean)]
    dae_maps = {name: [dae.predict(image, mask).anomaly_map for _, image, _, mask in cases]
                for name, cases in (("clean", clean), ("shifted", shifted))}
    post = PostprocessConfig(threshold=0.0, median_mm=0.0)
    print("degree | patch-retrieval alone: clean, shifted | fused with the dae: clean, shifted, AUPRC synthetic "
          "shifted, AUPRC stroke shifted | flagged ml on shifted healthy scans: alone, fused")
    for degree in args.degrees:
        model = refitted(bundled.model, degree, volumes, masks)
        retrieval_maps = {name: [model.predict(image, mask).anomaly_map for _, image, _, mask in cases]
                          for name, cases in (("clean", clean), ("shifted", shifted))}
        row = []
        for weights in ((0.0, 1.0), fusion.weights):  # patch retrieval alone, then the bundled fusion
            config = replace(fusion, weights=weights)
            fused = {name: [(kind, fuse_maps([dae_map, retrieval_map], mask, config), truth, mask)
                            for (kind, _, truth, mask), dae_map, retrieval_map
                            in zip(cases, dae_maps[name], retrieval_maps[name])]
                     for name, cases in (("clean", clean), ("shifted", shifted))}
            on_clean = score(fused["clean"], post, 0.01)
            calibrated = replace(post, threshold=on_clean["threshold"])
            healthy_clean = [case for case in fused["clean"] if case[0] == "healthy"]
            on_shifted = score(healthy_clean + [case for case in fused["shifted"] if case[0] != "healthy"], post, 0.01)
            flagged = np.mean([segment_filtered(fused_map, mask, SPACING, calibrated).sum() * np.prod(SPACING) / 1000
                               for kind, fused_map, _, mask in fused["shifted"] if kind == "healthy"])
            row.append((on_clean, on_shifted, flagged))
        (alone_clean, alone_shifted, alone_ml), (fused_clean, fused_shifted, fused_ml) = row
        print(f"{degree} | {alone_clean['mean']:.4f} {alone_shifted['mean']:.4f} | {fused_clean['mean']:.4f} "
              f"{fused_shifted['mean']:.4f} {fused_shifted['auprc synthetic']:.4f} {fused_shifted['auprc stroke']:.4f} "
              f"| {alone_ml:.1f} {fused_ml:.1f}", flush=True)


if __name__ == "__main__":
    main()
