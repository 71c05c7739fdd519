"""Default thresholds from healthy data only, and the validation score that picks checkpoints.

The operating threshold is the anomaly-map value exceeded by ``fpr`` (default 1 %) of healthy brain voxels,
measured exactly where segmentation thresholds: on the median-filtered map (unless the model has no median filter)
inside the eroded brain mask.
Lesion cases are never used here.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from uad.bundle import add_to_manifest
from uad.checkpoint import load_checkpoint, save_checkpoint
from uad.data import find_subjects, load_cached, prepare_cohort
from uad.errors import UserInputError
from uad.metrics import auprc, slice_level_auroc
from uad.models import AnomalyModel
from uad.models.base import predict_with_mask_mode
from uad.options import MASK_SIZES_MM
from uad.postprocessing import PostprocessConfig, erode_brain_mask, median_filter
from uad.preprocessing import PreprocessConfig
from uad.synthetic import add_synthetic_anomaly


def filtered_map(model: AnomalyModel, image: np.ndarray, mask: np.ndarray, post: PostprocessConfig,
                 spacing: tuple[float, float, float], mask_size_px: int | None = None,
                 mask_mode: str = "sliding") -> np.ndarray:
    prediction = predict_with_mask_mode(model, image, mask, mask_size_px, mask_mode)
    return median_filter(prediction.anomaly_map, mask, spacing, post.median_mm)


def healthy_threshold(filtered_maps, masks, post: PostprocessConfig, fpr: float,
                      spacing: tuple[float, float, float]) -> tuple[float, int]:
    """(The value exceeded by ``fpr`` of the healthy voxels, how many voxels): of median-filtered healthy maps,
    inside the brain masks eroded as segmentation erodes them."""
    pooled = np.concatenate([filtered[erode_brain_mask(mask, spacing, post.brain_erosion_mm)]
                             for filtered, mask in zip(filtered_maps, masks)])
    return float(np.quantile(pooled, 1.0 - fpr)), int(pooled.size)


def calibrate(model: AnomalyModel, images: np.ndarray, masks: np.ndarray, post: PostprocessConfig,
              fpr: float = 0.01, spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
              mask_size_px: int | None = None, mask_mode: str = "sliding") -> dict:
    """Threshold at the (1 - fpr) quantile of healthy voxel values; returns the checkpoint's calibration."""
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    smoothed = [filtered_map(model, image, mask, post, spacing, mask_size_px, mask_mode)
                for image, mask in zip(images, masks)]
    threshold, n_voxels = healthy_threshold(smoothed, masks, post, fpr, spacing)
    return {
        "threshold": threshold,
        "fpr": fpr,
        "method": f"quantile of {'median-filtered ' if post.median_mm else ''}healthy map values inside the eroded "
                  "brain mask",
        "n_volumes": len(images),
        "n_voxels": n_voxels,
        "postprocessing": {**post.to_dict(), "threshold": threshold},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def calibrate_model(model: AnomalyModel, images: np.ndarray, masks: np.ndarray, post: PostprocessConfig, fpr: float,
                    preprocessing: PreprocessConfig) -> dict:
    """:func:`calibrate`, plus one threshold per mask size for masking models (stored in the checkpoint), and the
    same again per mask mode other than ``sliding``, under ``threshold_by_mask_mode``.

    A smaller mask leaves more context around each masked pixel, so a lower healthy error: one threshold for
    both sizes would flag too little at one and too much at the other. Iterative masking changes the healthy
    error as well, so it gets its own thresholds.
    """
    spacing = (preprocessing.working_grid.spacing,) * 3

    def thresholds(mask_mode: str) -> dict:
        calibration = calibrate(model, images, masks, post, fpr, spacing, mask_mode=mask_mode)
        if model.uses_mask_size:
            calibration["threshold_by_mask_size_mm"] = {
                str(mm): calibrate(model, images, masks, post, fpr, spacing, preprocessing.mask_size_px(mm),
                                   mask_mode)["threshold"]
                for mm in MASK_SIZES_MM}
        return calibration

    calibration = thresholds("sliding")
    other_modes = [mode for mode in model.mask_modes if mode != "sliding"]
    if other_modes:
        calibration["threshold_by_mask_mode"] = {mode: {key: value for key, value in thresholds(mode).items()
                                                        if key.startswith("threshold")} for mode in other_modes}
    return calibration


SYNTHETIC_VALIDATION_SEED_OFFSET = 1000  # validation anomalies are drawn apart from any other seeded stream


def validation_anomalies(images: np.ndarray, masks: np.ndarray, seed: int = 0, anomalies_per_volume: int = 2,
                         spacing_mm: float = 2.0):
    """Yields (image with a synthetic anomaly, its truth, brain mask) per validation case, drawn from a fixed seed."""
    rng = np.random.default_rng(seed + SYNTHETIC_VALIDATION_SEED_OFFSET)
    for image, mask in zip(images, masks):
        for _ in range(anomalies_per_volume):
            modified, truth = add_synthetic_anomaly(image, mask, rng, spacing_mm=spacing_mm)
            yield modified, truth, mask


def validation_auprc(model: AnomalyModel, images: np.ndarray, masks: np.ndarray, seed: int = 0,
                     anomalies_per_volume: int = 2, spacing_mm: float = 2.0, mask_size_px: int | None = None,
                     mask_mode: str = "sliding") -> float:
    """Pooled voxel AUPRC on synthetic anomalies in the validation volumes (fixed seed: comparable over steps)."""
    post = PostprocessConfig(threshold=0.0)
    scores, labels, brains = [], [], []
    for modified, truth, mask in validation_anomalies(images, masks, seed, anomalies_per_volume, spacing_mm):
        scores.append(filtered_map(model, modified, mask, post, (spacing_mm,) * 3, mask_size_px, mask_mode))
        labels.append(truth)
        brains.append(mask)
    return auprc(np.stack(scores), np.stack(labels), mask=np.stack(brains))


def validation_slice_auroc(model: AnomalyModel, images: np.ndarray, masks: np.ndarray, seed: int = 0,
                           anomalies_per_volume: int = 2, spacing_mm: float = 2.0) -> float:
    """Slice AUROC (Georgescu) of the model's own slice scores on the synthetic anomalies of ``validation_auprc``.

    The score for models whose slice classifier is what training changes (mae-classifier): their pixel map is a
    frozen first stage's, so its AUPRC could not tell one checkpoint from another. Axial slices with brain; a slice
    is abnormal when it holds any anomaly voxel.
    """
    scores, labels = [], []
    for modified, truth, mask in validation_anomalies(images, masks, seed, anomalies_per_volume, spacing_mm):
        has_brain = mask.any(axis=(0, 1))
        scores.append(model.predict(modified, mask).slice_scores[has_brain])
        labels.append(truth.any(axis=(0, 1))[has_brain])
    return slice_level_auroc(np.concatenate(scores), np.concatenate(labels))


VALIDATION_SCORES = {"auprc": validation_auprc, "slice_auroc": validation_slice_auroc}
VALIDATION_SCORE_NAMES = {"auprc": "AUPRC", "slice_auroc": "slice AUROC"}  # as logs and model cards print them


def recalibrate_checkpoint(path: Path, data_dir: str, cache_dir: str, fpr: float = 0.01,
                           skull_stripped: bool = False) -> float:
    """Re-set a checkpoint's threshold from healthy scans in ``data_dir``.

    Never from its training subjects (their error is too low), nor from the test subjects its evaluation holds
    out (a threshold seen on them would flatter every figure measured there): on the cohort it was trained on,
    that leaves its validation subjects; on a site's own scans, all of them.
    """
    checkpoint = load_checkpoint(path)
    split = checkpoint.training.get("subjects", {})
    held_back = set(split.get("train", [])) | set(split.get("test", []))
    subjects = [s for s in find_subjects(data_dir) if s.subject_id not in held_back]
    if not subjects:
        raise UserInputError(f"every scan in {data_dir} was used to train or test this model; give other healthy "
                             "scans")
    cached = prepare_cohort(subjects, checkpoint.preprocessing, cache_dir, skull_stripped=skull_stripped)
    pairs = [load_cached(p) for p in cached.values()]
    post = PostprocessConfig.from_dict(checkpoint.calibration.get("postprocessing") or {"threshold": 0.0})
    checkpoint.calibration = calibrate_model(checkpoint.model, np.stack([p[0] for p in pairs]),
                                             np.stack([p[1] for p in pairs]), post, fpr, checkpoint.preprocessing)
    checkpoint.calibration["subjects"] = sorted(cached)
    save_checkpoint(checkpoint, path)
    add_to_manifest(path, checkpoint)
    return checkpoint.calibration["threshold"]
