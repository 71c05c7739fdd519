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
    # Iterative masking has its own thresholds (the default size and each size), from iterative maps.
    iterative = {"threshold": calibrate(swin, images[:2], masks[:2], post, 0.05, SPACING,
                                        mask_mode="iterative")["threshold"],
                 "threshold_by_mask_size_mm": {
                     str(mm): calibrate(swin, images[:2], masks[:2], post, 0.05, SPACING,
                                        preprocessing.mask_size_px(mm), mask_mode="iterative")["threshold"]
                     for mm in (32, 64)}}
    assert calibration["threshold_by_mask_mode"] == {"iterative": iterative}
    assert iterative["threshold"] != calibration["threshold"]
    assert iterative["threshold_by_mask_size_mm"]["32"] != by_size["32"]
    direct, _ = direct_threshold([swin.predict(image, mask, mask_mode="iterative").anomaly_map
                                  for image, mask in zip(images[:2], masks[:2])], masks[:2], median_voxels=1,
                                 erosion_voxels=1, fpr=0.05)
    assert iterative["threshold"] == pytest.approx(direct, rel=1e-6)

    intensity = build_model(IntensityConfig(grid_shape=SHAPE))
    intensity.fit(images, masks)
    plain = calibrate_model(intensity, images, masks, post, 0.05, preprocessing)
    assert "threshold_by_mask_size_mm" not in plain and "threshold_by_mask_mode" not in plain
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


def test_calibration_defaults_to_one_percent_and_records_how_and_when(cohort):
    """The documented default (1 % of healthy voxels) and the provenance 'uad models --provenance' prints."""
    from datetime import datetime, timedelta, timezone

    images, masks = cohort
    model = build_model(IntensityConfig(grid_shape=SHAPE))
    model.fit(images, masks)
    post = PostprocessConfig(threshold=0.0)
    calibration = calibrate(model, images, masks, post, spacing=SPACING)
    assert calibration["fpr"] == 0.01
    assert calibration["threshold"] == calibrate(model, images, masks, post, fpr=0.01, spacing=SPACING)["threshold"]
    assert calibration["method"] == "quantile of median-filtered healthy map values inside the eroded brain mask"
    date = datetime.fromisoformat(calibration["date"])
    assert date.utcoffset() == timedelta(0)  # UTC, written with its offset
    assert abs(datetime.now(timezone.utc) - date) < timedelta(minutes=5)


def test_calibrate_model_measures_region_and_filter_on_the_working_grids_spacing(cohort):
    """A 3 mm working grid: the median filter and the erosion are sized in mm, so in 3 mm voxels."""
    from uad.calibration import calibrate_model
    from uad.preprocessing import Grid, PreprocessConfig

    images, masks = cohort
    model = build_model(IntensityConfig(grid_shape=SHAPE))
    model.fit(images[:2], masks[:2])
    post = PostprocessConfig(threshold=0.0, median_mm=9.0, brain_erosion_mm=6.0)
    preprocessing = PreprocessConfig(working_grid=Grid(SHAPE, 3.0, (0.0, 0.0, 0.0)))
    calibration = calibrate_model(model, images[2:], masks[2:], post, 0.02, preprocessing)
    maps = [model.predict(image, mask).anomaly_map for image, mask in zip(images[2:], masks[2:])]
    expected, voxels = direct_threshold(maps, masks[2:], median_voxels=3, erosion_voxels=2, fpr=0.02)
    assert calibration["threshold"] == pytest.approx(expected, rel=1e-6) and calibration["n_voxels"] == voxels
    at_2mm = calibrate(model, images[2:], masks[2:], post, 0.02, SPACING)
    assert at_2mm["n_voxels"] != voxels


def direct_validation_auprc(predict, images, masks, seed: int, per_volume: int, spacing_mm: float) -> float:
    """The validation score, written out: the seeded synthetic anomalies, each map median-filtered as segmentation
    does, and scikit-learn's average precision over the brain voxels of every case pooled."""
    from sklearn.metrics import average_precision_score

    from uad.calibration import SYNTHETIC_VALIDATION_SEED_OFFSET
    from uad.postprocessing import median_filter
    from uad.synthetic import add_synthetic_anomaly

    rng = np.random.default_rng(seed + SYNTHETIC_VALIDATION_SEED_OFFSET)
    median_mm = PostprocessConfig(threshold=0.0).median_mm
    scores, labels = [], []
    for image, mask in zip(images, masks):
        for _ in range(per_volume):
            modified, truth = add_synthetic_anomaly(image, mask, rng, spacing_mm=spacing_mm)
            filtered = median_filter(predict(modified, mask), mask, (spacing_mm,) * 3, median_mm)
            scores.append(filtered[mask])
            labels.append(truth[mask])
    return float(average_precision_score(np.concatenate(labels), np.concatenate(scores)))


def test_validation_auprc_is_the_brain_average_precision_on_seeded_synthetic_anomalies(cohort):
    from uad.calibration import validation_auprc

    images, masks = cohort
    model = build_model(IntensityConfig(grid_shape=SHAPE))
    model.fit(images, masks)

    def predict(image, mask):
        return model.predict(image, mask).anomaly_map

    # The defaults training validates with: seed 0, two anomalies per volume, 2 mm voxels.
    assert validation_auprc(model, images, masks) == pytest.approx(
        direct_validation_auprc(predict, images, masks, seed=0, per_volume=2, spacing_mm=2.0), abs=1e-9)
    assert validation_auprc(model, images[:2], masks[:2], seed=5, anomalies_per_volume=3, spacing_mm=3.0) == \
        pytest.approx(direct_validation_auprc(predict, images[:2], masks[:2], seed=5, per_volume=3, spacing_mm=3.0),
                      abs=1e-9)


def test_masking_models_validate_and_filter_with_the_mask_size_and_mode_they_are_given(cohort):
    import torch

    from uad.calibration import filtered_map, validation_auprc
    from uad.models.swin_mae import SwinMAEConfig
    from uad.postprocessing import median_filter

    images, masks = cohort
    torch.manual_seed(0)
    swin = build_model(SwinMAEConfig(dim=16, heads=(2, 4))).eval()
    post = PostprocessConfig(threshold=0.0, median_mm=6.0)
    # Without a mask mode: the sliding mask, Ano-swinMAE's, at the model's default size.
    np.testing.assert_array_equal(filtered_map(swin, images[0], masks[0], post, SPACING),
                                  median_filter(swin.predict(images[0], masks[0]).anomaly_map, masks[0], SPACING, 6.0))
    one, one_mask = images[:1], masks[:1]
    default = validation_auprc(swin, one, one_mask, anomalies_per_volume=1)
    assert default == pytest.approx(direct_validation_auprc(
        lambda image, mask: swin.predict(image, mask).anomaly_map, one, one_mask, 0, 1, 2.0), abs=1e-9)
    given = validation_auprc(swin, one, one_mask, anomalies_per_volume=1, mask_size_px=16, mask_mode="iterative")
    assert given == pytest.approx(direct_validation_auprc(
        lambda image, mask: swin.predict(image, mask, mask_size_px=16, mask_mode="iterative").anomaly_map,
        one, one_mask, 0, 1, 2.0), abs=1e-9)
    assert given != default
