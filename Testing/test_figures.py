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


def panels(picture: np.ndarray, n_rows: int) -> list[list[np.ndarray]]:
    """Cut the PNG back into its panels: 48 x 5 = 240 rows and 40 x 5 = 200 columns each, 4-pixel gaps."""
    return [[picture[r * 244 : r * 244 + 240, c * 204 : c * 204 + 200] for c in range(4)] for r in range(n_rows)]


def test_overview_has_the_expected_size(tmp_path):
    path = tmp_path / "overview.png"
    save_overview(path, **scene(), n_slices=4)
    picture = io.imread(path)
    # Slices are enlarged 5x (256 // 48). Width: 4 panels of 200 + 3 gaps; height: 4 rows of 240 + 3 gaps,
    # then a gap and the 10-pixel colour bar.
    assert picture.shape == (4 * 240 + 3 * 4 + 4 + 10, 4 * 200 + 3 * 4, 3)
    assert picture.dtype == np.uint8


def test_overview_is_radiological_with_anterior_up(tmp_path):
    path = tmp_path / "overview.png"
    save_overview(path, **scene(), n_slices=2)
    first_panel = panels(io.imread(path), 2)[0][0]
    # The marker is at the patient's right and anterior: top left on screen.
    assert first_panel[:25, :25].min() == 255
    assert first_panel[:25, -25:].max() == 0
    assert first_panel[-25:, :25].max() == 0


def test_overview_shows_the_map_above_half_the_threshold_and_the_outline_in_red(tmp_path):
    path = tmp_path / "overview.png"
    data = scene()
    save_overview(path, **data, n_slices=3)
    rows = panels(io.imread(path), 3)
    shown = choose_slices(data["segmentation"] > 0, data["anomaly_map"] > 1.0, data["brain_mask"], 3)
    lesion_row = rows[shown.index(LESION_SLICE)]
    quiet_row = rows[next(i for i, k in enumerate(shown) if abs(k - LESION_SLICE) > 1)]

    is_red = np.all(lesion_row[3] == RED, axis=-1)
    assert 0 < is_red.sum() < 0.1 * is_red.size  # an outline, not a filled region
    assert not np.any(np.all(quiet_row[3] == RED, axis=-1))
    assert np.any(lesion_row[2] != lesion_row[0])  # the map is painted where it is high
    np.testing.assert_array_equal(quiet_row[2], quiet_row[0])  # and transparent where it is 0


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
