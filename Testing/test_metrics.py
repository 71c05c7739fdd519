"""Metrics against the reference implementations (scikit-learn, scikit-image) and on hand-checked cases."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from skimage.metrics import structural_similarity
from sklearn.metrics import average_precision_score, roc_auc_score

from uad.metrics import auprc, auroc, best_dice, dice, slice_level_auroc, ssim_in_mask


def scores_with_ties(seed: int, n: int = 5000, levels: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores on a few distinct levels (many ties), labels that depend on them, and a brain mask."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, n).astype(np.float32) / levels
    labels = rng.random(n) < 0.05 + 0.4 * scores
    mask = rng.random(n) < 0.8
    return scores, labels, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_auprc_match_scikit_learn_with_ties_and_a_mask(seed):
    scores, labels, mask = scores_with_ties(seed)
    assert auroc(scores, labels, mask) == pytest.approx(roc_auc_score(labels[mask], scores[mask]), abs=1e-12)
    assert auprc(scores, labels, mask) == pytest.approx(average_precision_score(labels[mask], scores[mask]), abs=1e-12)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_and_auprc_match_scikit_learn_on_continuous_3d_scores():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(20, 20, 20))
    labels = scores + rng.normal(size=scores.shape) > 1.5
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels.ravel(), scores.ravel()), abs=1e-12)
    assert auprc(scores, labels) == pytest.approx(average_precision_score(labels.ravel(), scores.ravel()), abs=1e-12)


def test_perfect_and_inverted_rankings():
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.95])
    labels = np.array([0, 0, 0, 1, 1])
    assert auroc(scores, labels) == 1.0 and auprc(scores, labels) == 1.0
    assert auroc(-scores, labels) == 0.0
    assert auroc(np.zeros(5), labels) == 0.5  # all tied: chance


@pytest.mark.parametrize("metric", [auroc, auprc])
def test_one_class_only_gives_nan_instead_of_raising(metric):
    scores = np.linspace(0, 1, 10)
    assert math.isnan(metric(scores, np.zeros(10, bool)))
    assert math.isnan(metric(scores, np.ones(10, bool)))
    assert math.isnan(metric(scores, np.arange(10) > 5, mask=np.zeros(10, bool)))


def test_mask_excludes_voxels_outside_the_brain():
    scores = np.array([0.9, 0.1, 0.8, 0.2])
    labels = np.array([0, 1, 1, 0])  # the first two are wrongly ranked
    mask = np.array([False, False, True, True])
    assert auroc(scores, labels) == 0.25  # 1 of the 4 positive-negative pairs is ranked right
    assert auroc(scores, labels, mask) == 1.0


def test_metrics_are_fast_on_a_million_voxels():
    rng = np.random.default_rng(4)
    scores = rng.random(1_000_000).astype(np.float32)
    labels = rng.random(scores.size) < 0.02
    start = time.perf_counter()
    auroc(scores, labels), auprc(scores, labels), best_dice(scores, labels)
    # About 0.35 s for the three on the project's loaded 2-core machine; a loop over thresholds would take minutes.
    assert time.perf_counter() - start < 3.0


# Dice


@pytest.mark.parametrize(
    ("prediction", "truth", "expected"),
    [
        ([0, 0, 0, 0], [0, 0, 0, 0], 1.0),  # both empty: agreement
        ([1, 1, 0, 0], [0, 0, 0, 0], 0.0),
        ([0, 0, 0, 0], [0, 0, 1, 0], 0.0),
        ([1, 1, 0, 0], [1, 1, 0, 0], 1.0),
        ([1, 1, 1, 0], [0, 1, 1, 1], 2 * 2 / 6),
        ([0.0, 2.5, 0.0, 0.0], [False, True, False, False], 1.0),  # any non-zero is foreground
    ],
)
def test_dice_cases(prediction, truth, expected):
    assert dice(np.array(prediction), np.array(truth)) == pytest.approx(expected)


def test_dice_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros(3), np.zeros(4))


# Oracle best Dice


def brute_force_best_dice(scores: np.ndarray, labels: np.ndarray) -> float:
    return max(dice(scores >= value, labels) for value in np.unique(scores))


@pytest.mark.parametrize("seed", [0, 5])
def test_best_dice_is_exact_and_its_threshold_reproduces_it(seed):
    scores, labels, mask = scores_with_ties(seed, n=2000)
    best, threshold = best_dice(scores, labels, mask)
    assert best == pytest.approx(brute_force_best_dice(scores[mask], labels[mask]))
    assert dice(scores[mask] > threshold, labels[mask]) == pytest.approx(best)
    assert dice(scores[mask] >= threshold, labels[mask]) == pytest.approx(best)


def test_best_dice_over_quantiles_is_close_to_and_not_above_the_exact_one():
    rng = np.random.default_rng(6)
    scores = rng.random(20000)
    labels = rng.random(scores.size) < 0.3 * scores
    exact, _ = best_dice(scores, labels)
    approximate, threshold = best_dice(scores, labels, n_thresholds=100)
    assert exact - 0.01 < approximate <= exact + 1e-12
    assert dice(scores > threshold, labels) == pytest.approx(approximate)


def test_best_dice_finds_a_perfect_separation():
    scores = np.array([0.1, 0.3, 0.7, 0.9])
    best, threshold = best_dice(scores, np.array([0, 0, 1, 1]))
    assert best == 1.0 and threshold == pytest.approx(0.5)


def test_best_dice_without_lesion_is_nan():
    best, threshold = best_dice(np.linspace(0, 1, 5), np.zeros(5, bool))
    assert math.isnan(best) and math.isnan(threshold)


# SSIM


def test_ssim_in_mask_averages_2d_axial_ssim_maps_inside_the_mask():
    rng = np.random.default_rng(7)
    image = rng.random((24, 28, 10))
    reconstruction = np.clip(image + rng.normal(0, 0.1, image.shape), 0, 1)
    mask = np.zeros(image.shape, bool)
    mask[4:20, 5:22, 2:9] = True

    maps = [
        structural_similarity(image[:, :, k], reconstruction[:, :, k], data_range=1.0, full=True)[1]
        for k in range(image.shape[2])
    ]
    expected = np.stack(maps, axis=2)[mask].mean()
    assert ssim_in_mask(image, reconstruction, mask, data_range=1.0) == pytest.approx(expected, abs=1e-9)


def test_ssim_in_mask_is_one_for_a_perfect_reconstruction_and_lower_for_a_noisy_one():
    rng = np.random.default_rng(8)
    image = rng.random((16, 16, 8))
    mask = np.ones(image.shape, bool)
    assert ssim_in_mask(image, image.copy(), mask, data_range=1.0) == pytest.approx(1.0)
    assert ssim_in_mask(image, image + rng.normal(0, 0.2, image.shape), mask, data_range=1.0) < 0.9


def test_ssim_in_mask_is_quick_on_the_working_grid():
    rng = np.random.default_rng(9)
    image = rng.random((80, 96, 80)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[10:70, 10:86, 10:70] = True
    start = time.perf_counter()
    value = ssim_in_mask(image, image * 0.9, mask, data_range=1.0)
    assert 0 < value < 1
    assert time.perf_counter() - start < 2.0  # about 0.1 s measured


def test_ssim_in_mask_degenerate_cases_give_nan():
    image = np.ones((16, 16, 4))
    assert math.isnan(ssim_in_mask(image, image, np.zeros(image.shape, bool), data_range=1.0))
    small = np.ones((5, 16, 4))  # slices narrower than the 7x7 window
    assert math.isnan(ssim_in_mask(small, small, np.ones(small.shape, bool), data_range=1.0))


# Slice level


def test_slice_level_auroc_matches_scikit_learn_and_handles_one_class():
    rng = np.random.default_rng(10)
    slice_scores = np.round(rng.random(60), 1)
    slice_labels = rng.random(60) < slice_scores
    assert slice_level_auroc(slice_scores, slice_labels) == pytest.approx(roc_auc_score(slice_labels, slice_scores))
    assert math.isnan(slice_level_auroc(slice_scores, np.zeros(60, bool)))


def test_binned_pooled_metrics_agree_with_the_exact_ones():
    from uad.metrics import binned_auroc_auprc, histogram_edges, label_histograms

    rng = np.random.default_rng(3)
    scores = rng.normal(size=100_000)
    labels = rng.random(100_000) < 0.05
    scores[labels] += 1.5
    binned = binned_auroc_auprc(label_histograms(scores, labels, histogram_edges(scores)))
    assert abs(binned[0] - auroc(scores, labels)) < 1e-3
    assert abs(binned[1] - auprc(scores, labels)) < 3e-3


def test_bootstrap_intervals_are_reproducible_and_widen_with_fewer_subjects():
    from uad.metrics import histogram_edges, label_histograms, mean_interval, pooled_intervals

    rng = np.random.default_rng(4)
    subjects = []
    for shift in rng.uniform(0.5, 2.5, size=30):  # subjects differ: the interval must show it
        scores = rng.normal(size=5000)
        labels = rng.random(5000) < 0.05
        scores[labels] += shift
        subjects.append((scores, labels))
    edges = histogram_edges(np.concatenate([s for s, _ in subjects]))
    histograms = np.stack([label_histograms(s, lab, edges) for s, lab in subjects])
    first, again = pooled_intervals(histograms), pooled_intervals(histograms)
    assert first == again
    exact = auroc(np.concatenate([s for s, _ in subjects]), np.concatenate([lab for _, lab in subjects]))
    low, high = first["auroc_ci"]
    assert low < exact < high
    few_low, few_high = pooled_intervals(histograms[:6])["auroc_ci"]
    assert few_high - few_low > high - low
    values = rng.normal(0.5, 0.1, size=40)
    interval = mean_interval(values)
    assert interval[0] < values.mean() < interval[1]


def test_a_paired_interval_finds_a_consistent_gain_that_side_by_side_intervals_miss():
    """Subjects differ far more than the two models do; the better one gains a little on every subject."""
    from uad.metrics import histogram_edges, label_histograms, paired_difference_interval, pooled_intervals

    rng = np.random.default_rng(5)
    baseline, better = [], []
    for shift in rng.uniform(0.3, 3.0, size=30):
        scores = rng.normal(size=4000)
        labels = rng.random(4000) < 0.05
        baseline.append((scores + shift * labels, labels))
        better.append((scores + (shift + 0.15) * labels, labels))

    def intervals(subjects):
        edges = histogram_edges(np.concatenate([s for s, _ in subjects]))
        return pooled_intervals(np.stack([label_histograms(s, lab, edges) for s, lab in subjects]))

    base, model = intervals(baseline), intervals(better)
    assert model["auprc_ci"][0] < base["auprc_ci"][1]  # side by side they overlap
    low, high = paired_difference_interval(model["auprc_draws"], base["auprc_draws"])
    assert 0 < low < high
    assert paired_difference_interval(base["auprc_draws"], base["auprc_draws"]) == [0.0, 0.0]
