"""Synthetic anomalies for evaluation and model selection (Malé et al.'s protocol).

Half boxes, half ellipsoids, 20-30 mm wide along each axis, centred on a random brain voxel, filled with a
uniform random intensity (in normalised units, so it may be tissue-like: then only texture gives it away).
The ground truth is the shape inside the brain.
"""

from __future__ import annotations

import numpy as np


def add_synthetic_anomaly(image: np.ndarray, brain_mask: np.ndarray, rng: np.random.Generator,
                          spacing_mm: float = 2.0, size_range_mm: tuple[float, float] = (20.0, 30.0),
                          intensity_range: tuple[float, float] = (0.0, 1.0),
                          centres_from: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (image with one anomaly, its uint8 ground-truth mask); ``image`` is not modified.

    The centre is a random voxel of ``centres_from`` (default: the brain mask). An evaluation passes a fixed mask:
    a brain mask from registration moves by a voxel from run to run, and since the centre is an index into its
    voxel list, one voxel more or less would move every anomaly of the run.
    """
    brain = np.argwhere(brain_mask if centres_from is None else centres_from)
    centre = brain[rng.integers(len(brain))]
    half_widths = rng.uniform(*size_range_mm, size=3) / spacing_mm / 2
    grid = np.ogrid[tuple(slice(0, n) for n in image.shape)]
    offsets = [(axis - c) / h for axis, c, h in zip(grid, centre, half_widths)]
    if rng.random() < 0.5:
        shape = (np.abs(offsets[0]) <= 1) & (np.abs(offsets[1]) <= 1) & (np.abs(offsets[2]) <= 1)
    else:
        shape = offsets[0] ** 2 + offsets[1] ** 2 + offsets[2] ** 2 <= 1
    truth = shape & brain_mask.astype(bool)
    modified = image.copy()
    modified[truth] = rng.uniform(*intensity_range)
    return modified, truth.astype(np.uint8)
