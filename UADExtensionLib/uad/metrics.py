"""Detection-quality metrics (see EVALUATION.md, "Metrics"): pure numpy, sort-based, fast on ~1e6 voxels.

Voxel-wise metrics take an optional ``mask`` (the brain): only voxels where it is true count. A metric that is
undefined for the data (for example AUROC when no voxel is a lesion) returns ``nan`` rather than raising, so
that a per-volume table can be filled and averaged with ``np.nanmean``; each docstring says when.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

# SSIM window: skimage's default, and the width used by the papers we compare with.
_SSIM_WINDOW = 7


def auroc(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Area under the ROC curve of ``scores`` against boolean ``labels`` (ties count half, as in scikit-learn).

    nan when only one class is present: the curve needs at least one positive and one negative voxel.
    """
    scores, labels = _select(scores, labels, mask)
    n_positive = int(labels.sum())
    n_negative = labels.size - n_positive
    if n_positive == 0 or n_negative == 0:
        return float("nan")
    # Mann-Whitney U with mid-ranks for ties, which equals the trapezoidal area under the ROC curve.
    ranks = _mid_ranks(scores)
    u = ranks[labels].sum() - n_positive * (n_positive + 1) / 2.0
    return float(u / (n_positive * n_negative))


def auprc(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Average precision, the definition of ``sklearn.metrics.average_precision_score``.

    AP = sum over thresholds (distinct score values, descending) of (recall gain) x precision, without
    interpolation. nan when only one class is present: with no lesion there is no recall, and with no healthy
    voxel every ranking scores 1, which says nothing.
    """
    scores, labels = _select(scores, labels, mask)
    n_positive = int(labels.sum())
    if n_positive == 0 or n_positive == labels.size:
        return float("nan")
    true_positives, predicted = _cumulative_counts(scores, labels)
    precision = true_positives / predicted
    recall_gain = np.diff(true_positives, prepend=0) / n_positive
    return float(np.sum(recall_gain * precision))


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two binary arrays (non-zero = foreground); 1.0 when both are empty (perfect agreement)."""
    prediction, truth = np.asarray(prediction) != 0, np.asarray(truth) != 0
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(prediction & truth)) / total


def best_dice(
    scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None, n_thresholds: int | None = None
) -> tuple[float, float]:
    """ORACLE best Dice over thresholds, and that threshold: an upper bound that peeks at the labels.

    Report it labelled as oracle, next to the Dice at the calibrated operating threshold; it is not what a user
    gets. Predictions are ``scores > threshold``. With ``n_thresholds=None`` (default) the search is exact,
    over every distinct score value, and the returned threshold lies halfway between the lowest included and
    the highest excluded value (so ``>=`` gives the same prediction). With an integer, only that many
    quantiles of the scores are tried (each threshold then is a quantile value, the prediction ``> value``).

    (nan, nan) when no voxel is a lesion: the best "prediction" would be empty, which says nothing about the map.
    """
    scores, labels = _select(scores, labels, mask)
    n_positive = int(labels.sum())
    if n_positive == 0:
        return float("nan"), float("nan")
    order = np.argsort(scores, kind="stable")[::-1]
    descending = scores[order].astype(np.float64)
    cumulative_positives = np.cumsum(labels[order])

    if n_thresholds is None:
        last_of_value = np.flatnonzero(np.diff(descending, append=-np.inf))  # last index of each tied group
        true_positives = cumulative_positives[last_of_value]
        predicted = last_of_value + 1
        dice_values = 2.0 * true_positives / (predicted + n_positive)
        best = int(np.argmax(dice_values))
        included = descending[last_of_value[best]]
        if last_of_value[best] + 1 < descending.size:
            threshold = (included + descending[last_of_value[best] + 1]) / 2.0
        else:
            threshold = float(np.nextafter(included, -np.inf))
        return float(dice_values[best]), float(threshold)

    thresholds = np.unique(np.quantile(descending, np.linspace(0.0, 1.0, n_thresholds)))
    # Number of scores > t for each threshold t, via the ascending order of the same scores.
    predicted = descending.size - np.searchsorted(descending[::-1], thresholds, side="right")
    true_positives = np.where(predicted > 0, cumulative_positives[np.maximum(predicted - 1, 0)], 0)
    dice_values = 2.0 * true_positives / (predicted + n_positive)
    best = int(np.argmax(dice_values))
    return float(dice_values[best]), float(thresholds[best])


def ssim_in_mask(image: np.ndarray, reconstruction: np.ndarray, mask: np.ndarray, data_range: float) -> float:
    """Mean SSIM inside ``mask``, from 2D axial-slice SSIM maps (slices ``[:, :, k]``, 7x7 windows).

    2D per slice, because the fidelity figures we compare with (Malé et al.) are computed on 2D slices; the
    full SSIM map of each slice is averaged over the mask voxels of the whole volume. All slices go through
    skimage at once (the slice axis as its channel axis), about 0.1 s for an 80x96x80 working-grid volume.
    nan when the mask is empty or a slice is smaller than the 7x7 window.
    """
    if image.shape != reconstruction.shape or image.shape != mask.shape or image.ndim != 3:
        shapes = f"image {image.shape}, reconstruction {reconstruction.shape}, mask {np.shape(mask)}"
        raise ValueError(f"{shapes}: expected one 3D shape")
    mask = np.asarray(mask) != 0
    if not mask.any() or min(image.shape[:2]) < _SSIM_WINDOW:
        return float("nan")
    _, ssim_map = structural_similarity(
        np.asarray(image, np.float64),
        np.asarray(reconstruction, np.float64),
        win_size=_SSIM_WINDOW,
        data_range=data_range,
        channel_axis=2,
        full=True,
    )
    return float(ssim_map[mask].mean())


def slice_level_auroc(slice_scores: np.ndarray, slice_labels: np.ndarray) -> float:
    """AUROC over slices (Georgescu et al.): a slice is abnormal when it contains any lesion voxel.

    The caller passes only slices that contain brain, as the protocol asks. nan when all slices are of one class.
    """
    return auroc(np.asarray(slice_scores).ravel(), np.asarray(slice_labels).ravel())


def _select(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Flat scores and boolean labels over the mask's voxels (all voxels without a mask)."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores shape {scores.shape} differs from labels shape {labels.shape}")
    if mask is None:
        return scores.ravel(), labels.ravel() != 0
    mask = np.asarray(mask) != 0
    if mask.shape != scores.shape:
        raise ValueError(f"mask shape {mask.shape} differs from scores shape {scores.shape}")
    return scores[mask], labels[mask] != 0


def _mid_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    group_starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    group_ends = np.r_[group_starts[1:], ordered.size]  # exclusive
    group_ranks = (group_starts + 1 + group_ends) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(values.size, np.float64)
    ranks[order] = np.repeat(group_ranks, group_ends - group_starts)
    return ranks


def _cumulative_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, predicted positives) at each distinct score, thresholds descending (``score >= t``)."""
    order = np.argsort(scores, kind="stable")[::-1]
    descending = scores[order]
    last_of_value = np.flatnonzero(np.r_[descending[1:] != descending[:-1], True])
    true_positives = np.cumsum(labels[order])[last_of_value]
    return true_positives.astype(np.float64), (last_of_value + 1).astype(np.float64)


# --- Confidence intervals over subjects -------------------------------------------------------------------------
# A pooled AUROC/AUPRC over ~1e7 voxels costs a sort; a thousand bootstrap resamples of it would cost minutes per
# model. Each subject's voxels are instead counted once into score bins (positives and negatives apart), and a
# resample is a weighted sum of those histograms. With a few thousand bins set at quantiles of all scores, the
# binned metric differs from the exact one by ~1e-4, far below the interval widths it serves.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def histogram_edges(scores: np.ndarray, bins: int = 4096) -> np.ndarray:
    """Bin edges at quantiles of ``scores`` (ties collapse), open-ended on both sides."""
    inner = np.unique(np.quantile(np.asarray(scores, np.float64), np.linspace(0, 1, bins + 1)[1:-1]))
    return np.r_[-np.inf, inner, np.inf]


def label_histograms(scores: np.ndarray, labels: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(2, bins) counts of negative (row 0) and positive (row 1) voxels per score bin."""
    labels = np.asarray(labels) != 0
    index = np.searchsorted(edges, np.asarray(scores, np.float64), side="right") - 1
    return np.stack([np.bincount(index[~labels], minlength=len(edges) - 1),
                     np.bincount(index[labels], minlength=len(edges) - 1)]).astype(np.float64)


def binned_auroc_auprc(histograms: np.ndarray) -> tuple[float, float]:
    """AUROC (ties within a bin count half) and average precision from (..., 2, bins) summed counts."""
    negatives, positives = histograms[0][::-1], histograms[1][::-1]  # bins from the highest score down
    n_negative, n_positive = negatives.sum(), positives.sum()
    if n_negative == 0 or n_positive == 0:
        return float("nan"), float("nan")
    negatives_above = np.cumsum(negatives) - negatives
    roc = float(np.sum(positives * (negatives_above + negatives / 2)) / (n_positive * n_negative))
    true_positives, predicted = np.cumsum(positives), np.cumsum(positives + negatives)
    precision = np.divide(true_positives, predicted, out=np.zeros_like(predicted), where=predicted > 0)
    return 1.0 - roc, float(np.sum(positives / n_positive * precision))


def bootstrap_draws(values: np.ndarray, statistic, resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``statistic(values[resampled subjects])`` per resample; ``values`` has one row per subject.

    The seed is fixed, so resample k draws the same subjects for every model evaluated on the same subjects: the
    draws of two models can be subtracted (paired_difference_interval).
    """
    values = np.asarray(values)
    rng = np.random.default_rng(seed)
    return np.asarray([statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(resamples)],
                      np.float64)


def bootstrap_interval(values: np.ndarray, statistic, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95 % percentile interval of ``statistic(values[resampled subjects])``; ``values`` has one row per subject."""
    low, high = np.nanpercentile(bootstrap_draws(values, statistic, resamples, seed), [2.5, 97.5], axis=0)
    return low, high


def pooled_intervals(per_subject_histograms: np.ndarray) -> dict[str, list[float]]:
    """95 % intervals of pooled AUROC and AUPRC over subjects, from (subjects, 2, bins) histograms, and the
    bootstrap draws they come from (``auroc_draws``, ``auprc_draws``) for paired comparisons."""
    draws = bootstrap_draws(per_subject_histograms, lambda h: np.array(binned_auroc_auprc(h.sum(axis=0))))
    (auroc_low, auprc_low), (auroc_high, auprc_high) = np.nanpercentile(draws, [2.5, 97.5], axis=0)
    return {"auroc_ci": [float(auroc_low), float(auroc_high)], "auprc_ci": [float(auprc_low), float(auprc_high)],
            "auroc_draws": np.round(draws[:, 0], 6).tolist(), "auprc_draws": np.round(draws[:, 1], 6).tolist()}


def paired_difference_interval(draws: list[float], baseline_draws: list[float]) -> list[float]:
    """95 % interval of (model - baseline) over the same bootstrap resamples of the same subjects.

    Two models scored on the same subjects are correlated: a hard subject is hard for both. Whether one beats the
    other is a question about their difference, whose interval is narrower than the two intervals side by side.
    """
    difference = np.asarray(draws, np.float64) - np.asarray(baseline_draws, np.float64)
    low, high = np.nanpercentile(difference, [2.5, 97.5])
    return [float(low), float(high)]


def mean_interval(per_subject_values: np.ndarray) -> list[float]:
    """95 % interval of the mean of per-subject values (e.g. each subject's mean Dice)."""
    low, high = bootstrap_interval(np.asarray(per_subject_values, np.float64), lambda v: np.nanmean(v))
    return [float(low), float(high)]
