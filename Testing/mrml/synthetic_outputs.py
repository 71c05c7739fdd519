"""A ``uad detect`` output folder without a model: two Gaussian "lesions" in an ellipsoid brain.

Used by the MRML tests directly and by ``fake_uad.py`` (the stand-in backend process). Lesion A peaks at 1.0
and lesion B at 0.65, so a threshold of 0.5 finds both and 0.7 only A. The segmentation is computed with the
real ``uad.postprocessing`` so it matches what re-thresholding in the Slicer logic produces.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from uad.postprocessing import PostprocessConfig, median_filter, segment_filtered

THRESHOLD = 0.5
# Lesion centres as offsets from the brain's centre, in units of the brain's radius along each axis.
LESION_A = (-0.4, -0.4, -0.3)
LESION_B = (0.4, 0.4, 0.24)


def synthetic_maps(
    shape: tuple[int, int, int], brain_radius=None, sigma_voxels=(4.0, 4.0, 2.0)
) -> dict[str, np.ndarray]:
    """(i, j, k) arrays: brain mask (an ellipsoid, by default filling the volume), anomaly map, residual,
    reconstruction."""
    grid = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape, np.float32) - 1) / 2
    radius = np.array(brain_radius if brain_radius else np.array(shape) / 2 - 0.5, np.float32)
    brain = (((grid - centre[:, None, None, None]) / radius[:, None, None, None]) ** 2).sum(axis=0) <= 1.0
    anomaly = np.zeros(shape, np.float32)
    for offset, peak in ((LESION_A, 1.0), (LESION_B, 0.65)):
        position = centre + np.array(offset, np.float32) * radius
        distance2 = sum(((grid[a] - position[a]) / sigma_voxels[a]) ** 2 for a in range(3))
        # Cut at 3 sigma: exact zeros keep the files small and the tails out of the brain's edge.
        anomaly += np.where(distance2 < 9.0, peak * np.exp(-0.5 * distance2), 0.0).astype(np.float32)
    anomaly *= brain
    residual = (0.5 * anomaly).astype(np.float32)
    reconstruction = (100.0 * brain).astype(np.float32)
    return {"brain_mask": brain, "anomaly_map": anomaly, "residual": residual, "reconstruction": reconstruction}


def write_out_dir(
    out_dir: str | Path,
    shape: tuple[int, int, int],
    affine: np.ndarray,
    threshold: float = THRESHOLD,
    median_mm: float = 3.0,
    min_component_mm3: float = 20.0,
    top_k: int = 10,
    report_extra: dict | None = None,
    brain_radius=None,
) -> Path:
    """Write the files ``uad detect`` writes (NIfTI on ``affine`` + report.json) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    maps = synthetic_maps(shape, brain_radius)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    config = PostprocessConfig(
        threshold=threshold, median_mm=median_mm, min_component_mm3=min_component_mm3, top_k=top_k
    )
    filtered = median_filter(maps["anomaly_map"], maps["brain_mask"], spacing, config.median_mm)
    segmentation = segment_filtered(filtered, maps["brain_mask"], spacing, config)
    files = {
        "reconstruction": (maps["reconstruction"], np.float32),
        "residual": (maps["residual"], np.float32),
        "anomaly_map": (maps["anomaly_map"], np.float32),
        "brain_mask": (maps["brain_mask"], np.uint8),
        "segmentation": (segmentation, np.uint8),
    }
    for name, (array, dtype) in files.items():
        image = nib.Nifti1Image(array.astype(dtype), affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        nib.save(image, str(out_dir / f"{name}.nii.gz"))
    report = {
        "model": "fake-model",
        "model_version": "3",
        "weights_sha256": "ab" * 32,
        "threshold": threshold,
        "device": "cpu",
        "mask_size": None,
        "seconds": {"total": 0.1},
        "date": "2025-01-02T03:04:05+00:00",
        "postprocessing": config.to_dict(),
        **(report_extra or {}),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return out_dir
