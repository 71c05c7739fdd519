"""A quick-look PNG of one detection: a few axial slices, with input, reconstruction, map and segmentation.

Inputs are arrays in canonical RAS voxel order (i: left -> right, j: posterior -> anterior, k: inferior ->
superior). Slices are shown the radiological way, as Slicer does: anterior up, the patient's right on the
viewer's left. Only numpy and scikit-image, no fonts: the layout is the legend.

Layout: one row per slice, most superior at the top; columns are the input, the reconstruction (same grey
window), the anomaly map in a hot colour map over the input, and the input with the segmentation outlined in
red. Under the map column, a colour bar runs over the map's display range with a white tick at the threshold.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from skimage import io
from skimage.segmentation import find_boundaries

_BACKGROUND = np.array([24, 24, 24], np.uint8)
_GAP = 4  # pixels between panels
_TARGET_PANEL = 256  # slices are enlarged by a whole factor to about this many pixels
_MARGIN = 3  # voxels of background kept around the brain in each panel
_COLOUR_BAR_HEIGHT = 10
_RED = np.array([255, 40, 40], np.uint8)
_WHITE = np.array([255, 255, 255], np.uint8)
_GREEN = np.array([40, 220, 40], np.uint8)
# Grey window: robust percentiles of the input inside the brain.
_WINDOW_PERCENTILES = (1.0, 99.5)
# The map is transparent below half the threshold, so near-threshold regions are seen before they segment.
_MAP_VISIBLE_FROM = 0.5
_MAP_MAX_ALPHA = 0.8


def save_overview(
    path: str | os.PathLike,
    image: np.ndarray,
    reconstruction: np.ndarray,
    anomaly_map: np.ndarray,
    segmentation: np.ndarray,
    brain_mask: np.ndarray,
    threshold: float,
    n_slices: int = 4,
) -> None:
    """Write the overview PNG described in the module docstring to ``path``.

    Slices: those with the most segmented voxels, else the most map voxels above the threshold, kept apart so
    that one lesion does not fill every row; rows left over are spread evenly over the brain.
    """
    if n_slices < 1:
        raise ValueError(f"n_slices must be at least 1, got {n_slices}")
    arrays = (image, reconstruction, anomaly_map, segmentation, brain_mask)
    if any(np.ndim(a) != 3 or np.shape(a) != np.shape(image) for a in arrays):
        raise ValueError(f"all arrays must be 3D of one shape, got {[np.shape(a) for a in arrays]}")
    brain = np.asarray(brain_mask) != 0
    segmented = np.asarray(segmentation) != 0
    slices = choose_slices(segmented, (anomaly_map > threshold) & brain, brain, n_slices)

    low, high = _window(image, brain)
    map_low, map_high = _map_range(anomaly_map, brain, threshold)
    region = _in_plane_region(brain)
    width, height = (region[0].stop - region[0].start), (region[1].stop - region[1].start)  # i across, j down
    zoom = max(1, _TARGET_PANEL // max(width, height))
    rows = []
    for k in slices:
        axial = (*region, k)
        grey = _grey(_display(image[axial]), low, high, zoom)
        panels = [
            grey,
            _grey(_display(reconstruction[axial]), low, high, zoom),
            _overlay_map(grey, _enlarge(_display(anomaly_map[axial]), zoom), map_low, map_high),
            _outline(grey, _enlarge(_display(segmented[axial]), zoom)),
        ]
        rows.append(_join(panels, axis=1))
    figure = _join(rows, axis=0)
    bar = _colour_bar(figure.shape[1], width * zoom, threshold, map_low, map_high)
    io.imsave(os.fspath(path), _join([figure, bar], axis=0), check_contrast=False)


def save_model_comparison(path: str | os.PathLike, columns: list[dict]) -> None:
    """Malé et al. Figure 2: rows healthy / abnormal; columns the input, then each model's reconstruction and map.

    Each entry of ``columns`` is one model on the same working-grid axial slice (canonical RAS (i, j) arrays):
    ``healthy_image``, ``abnormal_image``, ``brain``, ``truth`` (the anomaly, outlined in green on the abnormal
    input), ``{healthy,abnormal}_{reconstruction,map}`` and the model's ``threshold``. Maps are shown from half
    to twice the model's own threshold, so a colour means the same for every model.
    """
    first = columns[0]
    brain = np.asarray(first["brain"]) != 0
    region = _in_plane_region(brain[..., None])
    zoom = max(1, _TARGET_PANEL // 2 // max(region[0].stop - region[0].start, region[1].stop - region[1].start))
    low, high = _window(first["healthy_image"], brain)
    rows = []
    for row in ("healthy", "abnormal"):
        grey = _grey(_display(first[f"{row}_image"][region]), low, high, zoom)
        panels = [grey if row == "healthy" else _outline(grey, _enlarge(_display(first["truth"][region]), zoom),
                                                           _GREEN)]
        for column in columns:
            threshold = max(float(column["threshold"]), 1e-6)
            panels.append(_grey(_display(column[f"{row}_reconstruction"][region]), low, high, zoom))
            values = _enlarge(_display(column[f"{row}_map"][region]), zoom)
            panels.append(_overlay_map(grey, values, threshold * _MAP_VISIBLE_FROM, 2 * threshold))
        rows.append(_join(panels, axis=1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    io.imsave(os.fspath(path), _join(rows, axis=0), check_contrast=False)


def choose_slices(segmented: np.ndarray, above: np.ndarray, brain: np.ndarray, n_slices: int) -> list[int]:
    """Axial slice indices to show, most superior first (see :func:`save_overview`)."""
    brain_slices = np.flatnonzero(brain.any(axis=(0, 1)))
    if brain_slices.size == 0:
        brain_slices = np.arange(brain.shape[2])
    n_slices = min(n_slices, brain_slices.size)
    min_gap = max(1, (brain_slices[-1] - brain_slices[0] + 1) // (2 * n_slices))

    ranked = [
        int(k)
        for counts in (segmented.sum(axis=(0, 1)), above.sum(axis=(0, 1)))
        for k in np.argsort(-counts, kind="stable")
        if counts[k] > 0
    ]
    spread = [int(k) for k in np.linspace(brain_slices[0], brain_slices[-1], n_slices + 2)[1:-1].round()]
    chosen: list[int] = []
    # Interesting slices first, then evenly spread ones, each kept apart; then relax the spacing to fill up.
    for candidates, gap in ((ranked, min_gap), (spread, min_gap), (spread, 1), (brain_slices.tolist(), 1)):
        for k in candidates:
            if len(chosen) < n_slices and all(abs(k - c) >= gap for c in chosen):
                chosen.append(k)
    return sorted(chosen, reverse=True)


def _in_plane_region(brain: np.ndarray) -> tuple[slice, slice]:
    """The (i, j) extent of the brain over all slices plus a small margin: the panels show no empty head box."""
    footprint = brain.any(axis=2)
    if not footprint.any():
        return slice(0, brain.shape[0]), slice(0, brain.shape[1])
    region = []
    for axis in (0, 1):
        present = np.flatnonzero(footprint.any(axis=1 - axis))
        region.append(slice(max(present[0] - _MARGIN, 0), min(present[-1] + 1 + _MARGIN, brain.shape[axis])))
    return region[0], region[1]


def _display(axial: np.ndarray) -> np.ndarray:
    """An (i, j) axial slice as a picture: rows anterior -> posterior, columns patient right -> left."""
    return np.asarray(axial)[::-1, ::-1].T


def _enlarge(picture: np.ndarray, zoom: int) -> np.ndarray:
    return np.repeat(np.repeat(picture, zoom, axis=0), zoom, axis=1)


def _window(image: np.ndarray, brain: np.ndarray) -> tuple[float, float]:
    values = image[brain] if brain.any() else image.ravel()
    low, high = (float(v) for v in np.percentile(values, _WINDOW_PERCENTILES))
    return low, max(high, low + 1e-6)  # a flat image still gets a valid window


def _map_range(anomaly_map: np.ndarray, brain: np.ndarray, threshold: float) -> tuple[float, float]:
    """Map values shown from transparent (low) to white-hot (high); the threshold sits inside the range."""
    low = threshold * _MAP_VISIBLE_FROM if threshold > 0 else threshold - 1.0
    top = float(np.percentile(anomaly_map[brain], 99.9)) if brain.any() else threshold
    return low, max(top, threshold + (threshold - low))


def _grey(picture: np.ndarray, low: float, high: float, zoom: int) -> np.ndarray:
    scaled = np.clip((picture - low) / (high - low), 0.0, 1.0)
    grey = np.round(scaled * 255).astype(np.uint8)
    return np.repeat(_enlarge(grey, zoom)[..., None], 3, axis=2)


def _map_colour(fraction: np.ndarray) -> np.ndarray:
    """Fraction of the map's display range in [0, 1] -> RGB uint8, along the 'hot' colour map from dark red to
    yellow: it starts past black so faint values still read as map, and stops before white, which would be lost
    on white matter."""
    hot = 0.15 + 0.52 * fraction
    rgb = np.clip(np.stack([3 * hot, 3 * hot - 1, 3 * hot - 2], axis=-1), 0.0, 1.0)
    return np.round(rgb * 255).astype(np.uint8)


def _overlay_map(grey: np.ndarray, values: np.ndarray, low: float, high: float) -> np.ndarray:
    fraction = np.clip((values - low) / (high - low), 0.0, 1.0)
    colour = _map_colour(fraction).astype(np.float64)
    alpha = np.where(values > low, 0.35 + (_MAP_MAX_ALPHA - 0.35) * fraction, 0.0)[..., None]
    return np.round(grey * (1 - alpha) + colour * alpha).astype(np.uint8)


def _outline(grey: np.ndarray, segmented: np.ndarray, colour: np.ndarray = _RED) -> np.ndarray:
    picture = grey.copy()
    picture[find_boundaries(segmented, mode="inner")] = colour
    return picture


def _colour_bar(width: int, panel_width: int, threshold: float, low: float, high: float) -> np.ndarray:
    """A strip under the map column (the third) with the hot scale and a white tick at the threshold."""
    strip = np.empty((_COLOUR_BAR_HEIGHT, width, 3), np.uint8)
    strip[:] = _BACKGROUND
    start = 2 * (panel_width + _GAP)
    fraction = np.linspace(0.0, 1.0, panel_width)
    strip[:, start : start + panel_width] = _map_colour(fraction)
    tick = start + round((threshold - low) / (high - low) * (panel_width - 1))
    strip[:, max(tick - 1, start) : tick + 2] = _WHITE
    return strip


def _join(pictures: list[np.ndarray], axis: int) -> np.ndarray:
    """Pictures side by side (axis 1) or stacked (axis 0), with background-coloured gaps between them."""
    gap_shape = list(pictures[0].shape)
    gap_shape[axis] = _GAP
    gap = np.empty(gap_shape, np.uint8)
    gap[:] = _BACKGROUND
    parts = [pictures[0]]
    for picture in pictures[1:]:
        parts += [gap, picture]
    return np.concatenate(parts, axis=axis)
