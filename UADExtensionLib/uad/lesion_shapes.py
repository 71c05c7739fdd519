"""Realistic anomalies (EVALUATION.md protocol 2): real stroke-lesion masks placed into healthy scans.

The masks (``data/lesion_shapes``) are in MNI space, like the working grid, so a mask is resampled onto the
grid at its own anatomical position (no warp needed). The lesion is painted hypointense, like a chronic stroke
cavity on T1: the intensity of the darkest 5 % of the scan's brain (CSF-like), blended in over a softened
edge (Gaussian, sigma 1 voxel) so no model can find it by an artificial step at the border. Masks smaller than
``min_volume_ml`` inside the brain are skipped: at 2 mm a smaller lesion is a handful of voxels.
"""

from __future__ import annotations

from pathlib import Path

import ants
import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from uad.io import Volume
from uad.preprocessing import WORKING_GRID, Grid, to_ants


def lesion_shape_files(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("*.nii*"))


def shape_on_grid(path: Path, grid: Grid = WORKING_GRID) -> np.ndarray:
    """A lesion mask resampled onto ``grid`` as a fraction in [0, 1] per voxel."""
    image = nib.load(str(path))
    moving = to_ants(Volume((np.asarray(image.dataobj) > 0).astype(np.float32), image.affine))
    resampled = ants.resample_image_to_target(moving, grid.reference_image(), interp_type="linear")
    return np.clip(resampled.numpy(), 0, 1).astype(np.float32)


def add_stroke_lesion(image: np.ndarray, brain_mask: np.ndarray, rng: np.random.Generator, shapes: list[Path],
                      min_volume_ml: float = 1.0, spacing_mm: float = 2.0,
                      max_volume_ml: float = np.inf, contrast: float = 1.0) -> tuple[np.ndarray, np.ndarray, str]:
    """(image with one hypointense real lesion shape, its uint8 truth, the shape file's name).

    The shape is drawn among those with ``min_volume_ml`` to ``max_volume_ml`` (excluded) inside the brain.
    ``contrast`` is how far the lesion goes from the scan's own intensity towards the CSF-like fill: 1 is a chronic
    stroke cavity; many real lesions (MS, most tumours on T1) are only part of the way there.
    """
    if not 0 < contrast <= 1:
        raise ValueError(f"contrast must be in (0, 1], got {contrast}")
    brain = brain_mask > 0
    voxel_ml = spacing_mm**3 / 1000
    for _ in range(200):
        path = shapes[rng.integers(len(shapes))]
        fraction = shape_on_grid(path) * brain
        truth = fraction >= 0.5
        if min_volume_ml <= truth.sum() * voxel_ml < max_volume_ml:
            break
    else:
        raise ValueError(f"no lesion shape of {min_volume_ml} to {max_volume_ml} ml found in 200 draws")
    fill = float(np.percentile(image[brain], 5))
    weight = np.clip(gaussian_filter(truth.astype(np.float32), sigma=1.0), 0, 1) * brain
    weight = np.maximum(weight, truth) * contrast  # the lesion itself is filled evenly; only its rim is blended
    modified = (image * (1 - weight) + fill * weight).astype(np.float32)
    return modified, truth.astype(np.uint8), path.name


def add_stroke_lesions(image: np.ndarray, brain_mask: np.ndarray, rng: np.random.Generator, shapes: list[Path],
                       count: int, min_volume_ml: float, max_volume_ml: float, spacing_mm: float = 2.0,
                       contrast: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(image with ``count`` lesion shapes painted one after another, the uint8 union of their truths).

    Many small lesions in one scan, as in multiple sclerosis: a segmentation that keeps only its few most anomalous
    components, or smooths small ones away, is only caught by cases like these.
    """
    truth = np.zeros(image.shape, np.uint8)
    for _ in range(count):
        image, one, _ = add_stroke_lesion(image, brain_mask, rng, shapes, min_volume_ml=min_volume_ml,
                                          max_volume_ml=max_volume_ml, spacing_mm=spacing_mm, contrast=contrast)
        truth |= one
    return image, truth
