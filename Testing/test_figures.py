"""The overview PNG: size, orientation, overlays and the choice of slices."""

from __future__ import annotations

import numpy as np
from skimage import io

from uad.figures import choose_slices, save_overview

SHAPE = (40, 48, 32)  # (i, j, k): left -> right, posterior -> anterior, inferior -> superior
LESION_SLICE = 20
RED = (255, 40, 40)


def scene() -> dict:
    """A flat brain with a bright marker at the right-anterior corner and one anomaly in slice 20."""
    image = np.full(SHAPE, 0.5, np.float32)
    image[34:, 42:, :] = 1.0  # right (high i), anterior (high j), every slice
    anomaly = np.zeros(SHAPE, np.float32)
    anomaly[15:25, 20:30, LESION_SLICE - 1 : LESION_SLICE + 2] = 2.0
    anomaly[15:25, 20:30, LESION_SLICE] = 3.0
    return {
        "image": image,
        "reconstruction": np.full(SHAPE, 0.5, np.float32),
        "anomaly_map": anomaly,
        "segmentation": (anomaly > 2.5).astype(np.uint8),  # only slice 20
        "brain_mask": np.ones(SHAPE, bool),
        "threshold": 1.0,
    }


def panels(picture: np.ndarray, layout) -> list[list[np.ndarray]]:
    """Cut the PNG back into its panels, where the layout says they are."""
    return [[picture[top:bottom, left:right] for top, left, bottom, right in row] for row in layout.panels]


def test_overview_has_titled_columns_labelled_rows_and_whole_voxels(tmp_path):
    path = tmp_path / "overview.png"
    layout = save_overview(path, **scene(), n_slices=4, affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    picture = io.imread(path)
    assert picture.shape == (*layout.size, 3) and picture.dtype == np.uint8
    # Slices are enlarged 5x (256 // 48): every panel is 48 x 5 rows by 40 x 5 columns.
    assert {(bottom - top, right - left) for row in layout.panels for top, left, bottom, right in row} == {(240, 200)}
    assert layout.column_titles[0] == "Input" and "Anomaly map" in layout.column_titles[2]
    assert "Segmentation" in layout.column_titles[3]
    # Most superior first, with the position in mm (k * 2 mm) and the slice number.
    assert layout.row_labels[0] == f"S +{2 * layout.slices[0]} mm\nslice {layout.slices[0] + 1}/{SHAPE[2]}"
    assert layout.slices == sorted(layout.slices, reverse=True)
    # Text is around the panels, not on them: the space above the first row holds the titles.
    top = layout.panels[0][0][0]
    assert np.any(picture[:top] > 200)


def test_overview_is_radiological_with_anterior_up(tmp_path):
    path = tmp_path / "overview.png"
    layout = save_overview(path, **scene(), n_slices=2)
    first_panel = panels(io.imread(path), layout)[0][0]
    # The marker is at the patient's right and anterior: top left on screen.
    assert first_panel[:25, :25].min() == 255
    assert first_panel[:25, -25:].max() == 0
    assert first_panel[-25:, :25].max() == 0


def test_overview_marks_right_and_left_above_the_input(tmp_path):
    path = tmp_path / "overview.png"
    layout = save_overview(path, **scene(), n_slices=2)
    picture = io.imread(path)
    top, left, _, right = layout.panels[0][0]
    strip = picture[top - 20 : top, left:right].astype(int)
    yellow = (strip[..., 0] > 200) & (strip[..., 1] > 200) & (strip[..., 2] < 80)
    columns = np.flatnonzero(yellow.any(axis=0))
    width = right - left
    assert columns.size and columns.min() < 0.15 * width and columns.max() > 0.85 * width  # "R" ... "L"


def test_overview_shows_the_map_above_half_the_threshold_and_the_outline_in_red(tmp_path):
    path = tmp_path / "overview.png"
    data = scene()
    layout = save_overview(path, **data, n_slices=3)
    rows = panels(io.imread(path), layout)
    shown = layout.slices
    lesion_row = rows[shown.index(LESION_SLICE)]
    quiet_row = rows[next(i for i, k in enumerate(shown) if abs(k - LESION_SLICE) > 1)]

    is_red = np.all(lesion_row[3] == RED, axis=-1)
    assert 0 < is_red.sum() < 0.1 * is_red.size  # an outline, not a filled region
    assert not np.any(np.all(quiet_row[3] == RED, axis=-1))
    assert np.any(lesion_row[2] != lesion_row[0])  # the map is painted where it is high
    np.testing.assert_array_equal(quiet_row[2], quiet_row[0])  # and transparent where it is 0


def test_colour_bar_has_the_threshold_marked_where_its_value_is(tmp_path):
    path = tmp_path / "overview.png"
    layout = save_overview(path, **scene(), n_slices=2)
    picture = io.imread(path).astype(int)
    top, left, bottom, right = layout.colour_bar
    middle = picture[(top + bottom) // 2, left:right]
    low, high = layout.colour_range
    tick = round((layout.threshold - low) / (high - low) * (right - left - 1))
    assert middle[tick].min() > 230  # white at the threshold
    away = [x for x in range(2, right - left - 2) if abs(x - tick) > 4]
    redness = middle[away, 0] + middle[away, 1]
    assert np.all(np.diff(redness) >= -1)  # dark red to yellow, left to right
    assert low < layout.threshold < high


def test_slices_prefer_segmentation_kept_apart_then_spread_over_the_brain():
    segmented = np.zeros(SHAPE, bool)
    segmented[10:20, 10:20, 5] = True
    segmented[10:20, 10:15, 6] = True  # next to slice 5, smaller: skipped for variety
    segmented[10:12, 10:12, 25] = True
    nothing = np.zeros(SHAPE, bool)
    brain = np.ones(SHAPE, bool)

    chosen = choose_slices(segmented, nothing, brain, 4)

    assert len(chosen) == 4 and len(set(chosen)) == 4
    assert 5 in chosen and 25 in chosen and 6 not in chosen
    assert chosen == sorted(chosen, reverse=True)  # most superior first
    assert choose_slices(nothing, nothing, brain, 3) == [23, 16, 8]  # evenly inside 0..31
