"""Slice scores and the choices detect makes before any image is read, on small arrays whose answer is known
(fast: these are what the mutation run of inference.py executes; the end-to-end tests run the same code on scans)."""

from __future__ import annotations

import numpy as np
import pytest

from uad import catalog
from uad.errors import UserInputError
from uad.inference import DetectOptions, _scores, resolve_checkpoint_path, superior_axis
from uad.options import MASK_MODES

# (affine, voxel axis that runs inferior -> superior, whether it is stored superior first)
LAYOUTS = [
    (np.diag([1.0, 1.0, 1.0, 1.0]), 2, False),
    (np.diag([2.0, 1.5, -1.2, 1.0]), 2, True),
    (np.array([[0, 0, -2, 0], [2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1.0]]), 1, False),  # IXI's layout
    (np.array([[0, 0, 1.0, 0], [0, -1.0, 0, 0], [-3.0, 0, 0, 0], [0, 0, 0, 1]]), 0, True),
]


def scene(axis: int):
    """A 6 x 7 x 8 map whose slice i along ``axis`` holds i * 10 + noise; brain everywhere but slice 0, the scoring
    region everywhere but slices 0 and 1 and one voxel of slice 3, where the map is 1000."""
    shape = (6, 7, 8)
    index = np.indices(shape)[axis]
    anomaly_map = (np.random.default_rng(axis).random(shape) + 10 * index).astype(np.float32)
    brain = index > 0
    region = index > 1
    hole = tuple(np.argwhere(index == 3)[0])
    region[hole] = False
    anomaly_map[hole] = 1000.0
    return anomaly_map, brain, region, index


@pytest.mark.parametrize("affine, axis, superior_first", LAYOUTS)
def test_slice_scores_follow_the_inferior_superior_axis_from_inferior(affine, axis, superior_first):
    anomaly_map, brain, region, index = scene(axis)
    scores, volume_score = _scores(anomaly_map, brain, region, affine)
    size = anomaly_map.shape[axis]
    expected = []
    for i in range(size):
        if i == 0:
            expected.append(None)  # no brain
        elif i == 1:
            expected.append(0.0)  # brain, but none of the scoring region
        else:
            expected.append(round(float(np.percentile(anomaly_map[(index == i) & region], 99)), 6))
    if superior_first:
        expected = expected[::-1]
    assert scores == expected
    assert volume_score == max(s for s in expected if s is not None)
    assert all(s is None or s < 1000 for s in scores)  # the voxel outside the region never counts


def test_a_map_without_brain_scores_nothing():
    empty = np.zeros((4, 4, 4), bool)
    assert _scores(np.ones((4, 4, 4), np.float32), empty, empty, np.eye(4)) == ([None] * 4, 0.0)


def test_scores_are_rounded_to_six_decimals():
    anomaly_map = np.full((3, 3, 3), 1 / 3, np.float32)
    brain = np.ones((3, 3, 3), bool)
    scores, volume_score = _scores(anomaly_map, brain, brain, np.eye(4))
    assert scores == [0.333333] * 3 and volume_score == 0.333333


def test_models_are_found_by_name_path_or_default():
    assert resolve_checkpoint_path("intensity") == catalog.get_model_info("intensity").path
    assert resolve_checkpoint_path(None) == catalog.get_model_info(catalog.default_model_name()).path
    assert str(resolve_checkpoint_path("runs/x/model.pt")) == "runs/x/model.pt"
    assert str(resolve_checkpoint_path("mine.pt")) == "mine.pt"
    assert str(resolve_checkpoint_path("runs/mymodel")) == "runs/mymodel"
    with pytest.raises(UserInputError):
        resolve_checkpoint_path("no-such-model")


def test_detect_options_refuse_what_cannot_run():
    assert DetectOptions(mask_size=32).effective_mask_size == 32 and DetectOptions().effective_mask_size == 64
    with pytest.raises(UserInputError, match=r"^mask size 48 is not supported; use one of \(32, 64\) \(mm\)$"):
        DetectOptions(mask_size=48)
    assert DetectOptions(batch_size=1).batch_size == 1
    with pytest.raises(UserInputError, match="^batch size must be at least 1$"):
        DetectOptions(batch_size=0)
    with pytest.raises(UserInputError) as error:
        DetectOptions(mask_mode="random")
    assert str(error.value) == f"mask mode 'random' is not supported; use one of {MASK_MODES}"


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_superior_axis_is_the_best_aligned_one_whatever_the_voxel_sizes(sign):
    """Thick 5 mm slices tilted 30 degrees and 1 mm voxels along the other axis: the 1 mm axis is the closer to
    inferior-superior (cos 30 against sin 30), though the 5 mm axis moves more millimetres superior per voxel."""
    cos, sin = np.cos(np.radians(30)), np.sin(np.radians(30))
    affine = np.eye(4)
    affine[:3, :3] = np.column_stack([(1.0, 0, 0), (0, 5 * cos, 5 * sin), (0, -sign * sin, sign * cos)])
    assert superior_axis(affine) == (2, sign < 0)
