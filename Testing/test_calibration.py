"""Calibration checked against its definition: the threshold is the (1 - fpr) quantile of the median-filtered
healthy map inside the eroded brain, computed here directly with scipy on a small cohort."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from uad.calibration import calibrate
from uad.models import build_model
from uad.models.intensity import IntensityConfig
from uad.postprocessing import PostprocessConfig

SPACING = (2.0, 2.0, 2.0)
SHAPE = (24, 28, 24)


@pytest.fixture(scope="module")
def cohort():
    """Four healthy 'brains': an ellipsoid of noisy tissue whose rim is much noisier, as registration error makes it."""
    rng = np.random.default_rng(7)
    grid = np.indices(SHAPE).astype(float)
    radius = ((grid[0] - 11.5) / 10) ** 2 + ((grid[1] - 13.5) / 12) ** 2 + ((grid[2] - 11.5) / 10) ** 2
    mask = radius < 1
    rim = mask & (radius > 0.6)
    images = []
    for _ in range(4):
        image = 0.8 + rng.normal(0, 0.05, SHAPE) + rim * rng.normal(0, 0.4, SHAPE)
        images.append((image * mask).astype(np.float32))
    return np.stack(images), np.stack([mask] * 4)


def direct_threshold(maps, masks, median_voxels: int, erosion_voxels: int, fpr: float) -> tuple[float, int]:
    """The definition, written out: median filter (zero outside the brain), erosion by a ball, quantile."""
    offsets = np.indices((2 * erosion_voxels + 1,) * 3) - erosion_voxels
    ball = (offsets**2).sum(axis=0) <= erosion_voxels**2
    values = []
    for anomaly_map, mask in zip(maps, masks):
        filtered = ndimage.median_filter(np.where(mask, anomaly_map, 0), size=median_voxels, mode="constant")
        region = ndimage.binary_erosion(mask, structure=ball, border_value=0)
        values.append(filtered[region])
    pooled = np.concatenate(values)
    return float(np.quantile(pooled, 1 - fpr)), pooled.size


@pytest.mark.parametrize("fpr", [0.01, 0.05])
def test_threshold_is_the_healthy_quantile_inside_the_eroded_brain(cohort, fpr):
    images, masks = cohort
    model = build_model(IntensityConfig(grid_shape=SHAPE))
    model.fit(images[:2], masks[:2])  # "trained" on two, calibrated on the other two
    post = PostprocessConfig(threshold=0.0, median_mm=6.0, brain_erosion_mm=4.0)

    calibration = calibrate(model, images[2:], masks[2:], post, fpr=fpr, spacing=SPACING)

    maps = [model.predict(image, mask).anomaly_map for image, mask in zip(images[2:], masks[2:])]
    expected, voxels = direct_threshold(maps, masks[2:], median_voxels=3, erosion_voxels=2, fpr=fpr)
    assert calibration["threshold"] == pytest.approx(expected, rel=1e-6)
    assert calibration["n_voxels"] == voxels and calibration["n_volumes"] == 2 and calibration["fpr"] == fpr
    assert calibration["postprocessing"] == {**post.to_dict(), "threshold": calibration["threshold"]}
    # The eroded region matters here: the noisy rim would raise the threshold.
    with_rim, _ = direct_threshold(maps, masks[2:], median_voxels=3, erosion_voxels=0, fpr=fpr)
    assert with_rim > expected * 1.05


def test_the_threshold_leaves_fpr_of_healthy_voxels_strictly_above_it(cohort):
    """The threshold and the segmentation agree on '>': at most fpr of the calibration voxels exceed it."""
    images, masks = cohort
    model = build_model(IntensityConfig(grid_shape=SHAPE))
    model.fit(images, masks)
    post = PostprocessConfig(threshold=0.0, median_mm=0.0, brain_erosion_mm=0.0)
    calibration = calibrate(model, images, masks, post, fpr=0.02, spacing=SPACING)
    values = np.concatenate([model.predict(i, m).anomaly_map[m] for i, m in zip(images, masks)])
    above = np.mean(values > calibration["threshold"])
    assert 0.015 < above <= 0.02 + 1 / values.size  # the quantile interpolates between two voxel values


def test_fpr_outside_zero_one_is_refused(cohort):
    images, masks = cohort
    model = build_model(IntensityConfig(grid_shape=SHAPE))
    for fpr in (0.0, 1.0):
        with pytest.raises(ValueError, match="fpr"):
            calibrate(model, images, masks, PostprocessConfig(threshold=0.0), fpr=fpr, spacing=SPACING)


def test_masking_models_get_a_threshold_per_mask_size_and_others_do_not(cohort):
    import torch

    from uad.calibration import calibrate_model
    from uad.models.swin_mae import SwinMAEConfig
    from uad.preprocessing import PreprocessConfig

    images, masks = cohort
    post = PostprocessConfig(threshold=0.0, median_mm=0.0, brain_erosion_mm=2.0)
    preprocessing = PreprocessConfig()
    torch.manual_seed(0)
    swin = build_model(SwinMAEConfig(dim=16, heads=(2, 4))).eval()
    calibration = calibrate_model(swin, images[:2], masks[:2], post, 0.05, preprocessing)
    by_size = calibration["threshold_by_mask_size_mm"]
    assert set(by_size) == {"32", "64"}
    for mm in (32, 64):
        expected = calibrate(swin, images[:2], masks[:2], post, 0.05, SPACING, preprocessing.mask_size_px(mm))
        assert by_size[str(mm)] == expected["threshold"]
    assert by_size["32"] != by_size["64"]
    assert calibration["threshold"] == calibrate(swin, images[:2], masks[:2], post, 0.05, SPACING)["threshold"]

    intensity = build_model(IntensityConfig(grid_shape=SHAPE))
    intensity.fit(images, masks)
    plain = calibrate_model(intensity, images, masks, post, 0.05, preprocessing)
    assert "threshold_by_mask_size_mm" not in plain
    assert plain["threshold"] == calibrate(intensity, images, masks, post, 0.05, SPACING)["threshold"]


def test_validation_auprc_is_reproducible_and_rewards_a_model_that_sees_the_anomalies(cohort):
    from uad.calibration import validation_auprc

    images, masks = cohort
    fitted = build_model(IntensityConfig(grid_shape=SHAPE))
    fitted.fit(images, masks)
    blind = build_model(IntensityConfig(grid_shape=SHAPE))  # mean 0, std 1: the map is the image itself
    score = validation_auprc(fitted, images, masks, seed=3)
    assert score == validation_auprc(fitted, images, masks, seed=3)
    assert 0 < validation_auprc(blind, images, masks, seed=3) < score <= 1
