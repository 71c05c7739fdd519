"""A quick-look PNG of one detection: a few axial slices, with input, reconstruction, map and segmentation.

Inputs are arrays in canonical RAS voxel order (i: left -> right, j: posterior -> anterior, k: inferior ->
superior). Slices are shown the radiological way, as Slicer does: anterior up, the patient's right on the
viewer's left.

Layout: one row per slice, most superior at the top, each labelled with its position (S in mm when the affine
is known, and the slice index); titled columns are the input (with R and L marked), the reconstruction (same
grey window), the anomaly map in a hot colour map over the input, and the input with the segmentation outlined
in red. Under the map column, a colour bar with its values and the threshold marked. The panels are drawn
pixel for pixel (each voxel an exact square of pixels) and matplotlib adds the text around them; the layout it
returns says where each panel is, for tests and for anyone cutting the picture up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
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
# Room for text around the panels, in pixels (at _DPI): column titles, row labels, the colour bar and its labels.
_DPI = 100
_TITLE_SPACE = 44
_LABEL_SPACE = 112
_LABEL_SPACE_COMPARISON = 72
_BAR_SPACE = 90
_FONT_SIZE = 10
_COLUMN_TITLES = ("Input", "Reconstruction\n(pseudo-healthy)", "Anomaly map", "Segmentation\n(red outline)")


@dataclass
class OverviewLayout:
    """Where things are in the written PNG, in pixels: ``panels[row][column]`` is (top, left, bottom, right)."""

    panels: list[list[tuple[int, int, int, int]]]
    column_titles: tuple[str, ...]
    row_labels: list[str]
    slices: list[int]
    colour_bar: tuple[int, int, int, int]
    colour_range: tuple[float, float]
    threshold: float
    size: tuple[int, int] = field(default=(0, 0))  # (height, width)


def save_overview(
    path: str | os.PathLike,
    image: np.ndarray,
    reconstruction: np.ndarray,
    anomaly_map: np.ndarray,
    segmentation: np.ndarray,
    brain_mask: np.ndarray,
    threshold: float,
    n_slices: int = 4,
    affine: np.ndarray | None = None,
) -> OverviewLayout:
    """Write the overview PNG described in the module docstring to ``path``; ``affine`` (canonical voxel ->
    RAS mm) gives each row's position in mm.

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
        rows.append([
            grey,
            _grey(_display(reconstruction[axial]), low, high, zoom),
            _overlay_map(grey, _enlarge(_display(anomaly_map[axial]), zoom), map_low, map_high),
            _outline(grey, _enlarge(_display(segmented[axial]), zoom)),
        ])
    labels = [_slice_label(k, image.shape, region, affine) for k in slices]
    return _draw_with_text(Path(path), rows, labels, slices, threshold, (map_low, map_high))


def _slice_label(k: int, shape: tuple[int, ...], region: tuple[slice, slice], affine: np.ndarray | None) -> str:
    index = f"slice {k + 1}/{shape[2]}"
    if affine is None:
        return index
    centre = [(region[0].start + region[0].stop - 1) / 2, (region[1].start + region[1].stop - 1) / 2, k, 1.0]
    superior = float((np.asarray(affine, float) @ centre)[2])
    return f"S {superior:+.0f} mm\n{index}"


@dataclass(frozen=True)
class _ColourBar:
    """A colour bar under one panel column: the map's colours over ``value_range``, a line at ``threshold``."""

    column: int
    value_range: tuple[float, float]
    threshold: float
    threshold_text: str
    label: str


@dataclass(frozen=True)
class _Placed:
    panels: list[list[tuple[int, int, int, int]]]
    colour_bar: tuple[int, int, int, int]
    size: tuple[int, int]


def _draw_with_text(
    path: Path, rows: list[list[np.ndarray]], labels: list[str], slices: list[int], threshold: float,
    colour_range: tuple[float, float],
) -> OverviewLayout:
    bar = _ColourBar(2, colour_range, threshold, f"threshold {threshold:.3g}",
                     "anomaly score (transparent below the lowest value)")
    placed = _compose(path, rows, _COLUMN_TITLES[: len(rows[0])], labels, bar, radiological_column=0)
    return OverviewLayout(
        panels=placed.panels,
        column_titles=_COLUMN_TITLES[: len(rows[0])],
        row_labels=labels,
        slices=slices,
        colour_bar=placed.colour_bar,
        colour_range=colour_range,
        threshold=threshold,
        size=placed.size,
    )


def _compose(
    path: Path, rows: list[list[np.ndarray]], column_titles, row_labels: list[str], bar: _ColourBar,
    radiological_column: int | None = None, label_space: int = _LABEL_SPACE, font_size: int = _FONT_SIZE,
) -> _Placed:
    """Place the panels pixel for pixel on a matplotlib figure, add titles, row labels, R/L above one column and
    the colour bar, and write the PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state, no display
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure

    panel_height, panel_width = rows[0][0].shape[:2]
    columns = len(rows[0])
    width = label_space + columns * panel_width + (columns - 1) * _GAP + _GAP
    height = _TITLE_SPACE + len(rows) * panel_height + (len(rows) - 1) * _GAP + _BAR_SPACE
    background = tuple(_BACKGROUND / 255)
    figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor=background)
    FigureCanvasAgg(figure)
    text = {"color": "white", "fontsize": font_size}

    def axes_at(top: int, left: int, box_height: int, box_width: int):
        axes = figure.add_axes((left / width, 1 - (top + box_height) / height, box_width / width, box_height / height))
        axes.set_axis_off()
        return axes

    boxes = []
    for r, (row, label) in enumerate(zip(rows, row_labels)):
        top = _TITLE_SPACE + r * (panel_height + _GAP)
        row_boxes = []
        for c, panel in enumerate(row):
            left = label_space + c * (panel_width + _GAP)
            # figimage puts the pixels unresampled; the empty axes over it only carry the text.
            figure.figimage(panel, xo=left, yo=height - top - panel_height, origin="upper", zorder=0)
            axes = axes_at(top, left, panel_height, panel_width)
            axes.patch.set_visible(False)
            row_boxes.append((top, left, top + panel_height, left + panel_width))
            if r == 0:
                axes.set_title(column_titles[c], pad=4, **text)
            if r == 0 and c == radiological_column:  # the patient's right on the viewer's left; above the panel
                for x, letter, align in ((0.0, "R", "left"), (1.0, "L", "right")):
                    axes.text(x, 1.0, letter, transform=axes.transAxes, ha=align, va="bottom", fontweight="bold",
                              color="yellow", fontsize=font_size + 2)
        figure.text((label_space - 8) / width, 1 - (top + panel_height / 2) / height, label, ha="right",
                    va="center", **text)
        boxes.append(row_boxes)

    bar_top = _TITLE_SPACE + len(rows) * (panel_height + _GAP) + 26  # room for the threshold label above it
    bar_left = boxes[0][bar.column][1]
    bar_axes = figure.add_axes((bar_left / width, 1 - (bar_top + _COLOUR_BAR_HEIGHT) / height,
                                panel_width / width, _COLOUR_BAR_HEIGHT / height))
    colours = ListedColormap(_map_colour(np.linspace(0.0, 1.0, 256)) / 255.0)
    drawn = figure.colorbar(ScalarMappable(Normalize(*bar.value_range), colours), cax=bar_axes,
                            orientation="horizontal")
    drawn.outline.set_edgecolor("white")
    bar_axes.tick_params(colors="white", labelsize=font_size - 2)
    bar_axes.axvline(bar.threshold, color="white", linewidth=2)
    bar_axes.text(bar.threshold, 1.3, bar.threshold_text, transform=bar_axes.get_xaxis_transform(),
                  ha="center", va="bottom", **text)
    drawn.set_label(bar.label, color="white", fontsize=font_size - 2)

    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3]
    path.parent.mkdir(parents=True, exist_ok=True)
    io.imsave(os.fspath(path), pixels, check_contrast=False)
    return _Placed(boxes, (bar_top, bar_left, bar_top + _COLOUR_BAR_HEIGHT, bar_left + panel_width), (height, width))


def save_model_comparison(path: str | os.PathLike, columns: list[dict]) -> None:
    """Malé et al. Figure 2: rows healthy / abnormal; columns the input, then each model's reconstruction and map.

    Each entry of ``columns`` is one model on the same working-grid axial slice (canonical RAS (i, j) arrays):
    ``label``, ``healthy_image``, ``abnormal_image``, ``brain``, ``truth`` (the anomaly, outlined in green on the
    abnormal input), ``{healthy,abnormal}_{reconstruction,map}`` and the model's ``threshold``. Maps are shown
    from half to twice the model's own threshold, so a colour means the same for every model; the colour bar is
    in multiples of each model's threshold.
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
        rows.append(panels)
    titles = ["Input\n(R | L)"]  # radiological, as in the overview
    for column in columns:
        name = str(column.get("label", "")).replace("-", "-\n")  # long names would run into the next column
        titles += [f"{name}\nrecon.", f"{name}\nmap"]
    bar = _ColourBar(2, (_MAP_VISIBLE_FROM, 2.0), 1.0, "threshold", "map / the model's own threshold")
    _compose(Path(path), rows, titles, ["Healthy", "Abnormal\n(green:\ntruth)"], bar,
             label_space=_LABEL_SPACE_COMPARISON, font_size=_FONT_SIZE - 2)


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
