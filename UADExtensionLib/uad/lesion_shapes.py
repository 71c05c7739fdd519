"""Realistic anomalies (EVALUATION.md protocol 2): real stroke-lesion masks placed into healthy scans; and small
ovoid lesions in white matter, as multiple sclerosis shows them on T1.

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
    return paint_hypointense(image, truth, brain, contrast), truth.astype(np.uint8), path.name


def paint_hypointense(image: np.ndarray, truth: np.ndarray, brain: np.ndarray, contrast: float) -> np.ndarray:
    """``image`` with ``truth`` moved ``contrast`` of the way towards the scan's CSF-like fill (its darkest 5 % of
    brain), the lesion filled evenly and its rim blended (Gaussian, sigma 1 voxel)."""
    fill = float(np.percentile(image[brain], 5))
    weight = np.clip(gaussian_filter(truth.astype(np.float32), sigma=1.0), 0, 1) * brain
    weight = np.maximum(weight, truth) * contrast
    return (image * (1 - weight) + fill * weight).astype(np.float32)


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


def add_ovoid_lesions(image: np.ndarray, brain_mask: np.ndarray, rng: np.random.Generator, centres_from: np.ndarray,
                      count: int, contrast_range: tuple[float, float] = (0.15, 0.4),
                      long_semi_axis_mm: tuple[float, float] = (3.0, 8.0),
                      short_semi_axes_mm: tuple[float, float] = (2.0, 4.0),
                      spacing_mm: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """(image with ``count`` small ovoid lesions, the uint8 union of their truths), as multiple sclerosis shows them
    on T1: ellipsoids of about 0.05 to 0.5 ml at random orientations, centred on random voxels of ``centres_from``
    (e.g. periventricular white matter), each only ``contrast_range`` of the way to CSF: faint, not black holes."""
    brain = brain_mask > 0
    candidates = np.argwhere(centres_from)
    half_box = int(np.ceil(long_semi_axis_mm[1] / spacing_mm)) + 1
    offsets = np.stack(np.meshgrid(*[np.arange(-half_box, half_box + 1)] * 3, indexing="ij"), -1) * spacing_mm
    truth = np.zeros(image.shape, bool)
    for _ in range(count):
        centre = candidates[rng.integers(len(candidates))]
        semi_axes = np.array([rng.uniform(*long_semi_axis_mm), *rng.uniform(*short_semi_axes_mm, size=2)])
        rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))  # a random orientation
        inside = (((offsets @ rotation) / semi_axes) ** 2).sum(-1) <= 1
        lesion = np.zeros(image.shape, bool)
        box = tuple(slice(c - half_box, c + half_box + 1) for c in centre)
        clipped = tuple(slice(max(s.start, 0), min(s.stop, n)) for s, n in zip(box, image.shape))
        within = tuple(slice(c.start - s.start, c.stop - s.start) for c, s in zip(clipped, box))
        lesion[clipped] = inside[within]
        lesion &= brain
        image = paint_hypointense(image, lesion, brain, rng.uniform(*contrast_range))
        truth |= lesion
    return image, truth.astype(np.uint8)
