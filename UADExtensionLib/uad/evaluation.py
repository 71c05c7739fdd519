"""``uad evaluate``: every protocol of EVALUATION.md on held-out data, per model, written to BENCHMARKS.md.

- Synthetic anomalies (Malé et al.): healthy SSIM on the held-out IXI test split and on MASS (another site);
  one box or ellipsoid (20-30 mm, uniform random fill) per copy, four copies per held-out IXI scan, the same
  anomalies for every model (seeded per subject, centres drawn from a fixed template mask, so registration
  noise cannot move them); pixel AUROC / AUPRC of the map as segmented (median-filtered, except the fusion's,
  which is calibrated unfiltered) over brain voxels (per-volume mean and pooled); Dice at each model's calibrated
  threshold.
- Realistic shapes: one real stroke-lesion mask per held-out IXI scan, painted hypointense (lesion_shapes.py);
  pooled AUROC / AUPRC, Dice at the calibrated threshold, and Georgescu's slice-level AUROC. The same with two
  MS-sized shapes (0.15-1 ml) per scan, and with 8 to 24 of them at once in each scan (MS-like).
- Real lesions: the T1 cases through ``uad detect`` end to end, scored in their own grid; then the T2 / FLAIR
  of the same cases with the same T1-trained models (cross-contrast, as Ano-swinMAE's Table 2).
- A Figure-2-style picture (Malé et al.): one healthy and one abnormal scan, every model's reconstruction
  and map side by side.
Masking models are evaluated at both mask sizes, each with its own calibrated threshold. Per-model results are
cached by weights SHA-256, so adding a model re-runs only that model.

Every pooled AUROC / AUPRC and mean Dice comes with a 95 % bootstrap interval over subjects (a fixed seed:
the same data give the same interval), and "beats" means the intervals do not overlap. Beside it, the paired
interval of the difference from ``intensity`` (the same resamples of the same subjects, subtracted): models scored
on the same subjects share their hard subjects, so side-by-side intervals overstate how uncertain a difference is.
``uad`` runs registration single-threaded (see cli.py), so two runs on one machine give the same volumes
and figures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import tempfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from uad import resources
from uad.benchmarks_file import hardware_line, table, update_section
from uad.calibration import healthy_threshold
from uad.checkpoint import Checkpoint, load_checkpoint
from uad.data import find_subjects, load_cached, prepare_cohort, split_subjects
from uad.errors import UserInputError
from uad.figures import save_model_comparison
from uad.inference import DetectOptions, Detector, resolve_checkpoint_path, superior_axis
from uad.io import load_volume
from uad.lesion_shapes import add_stroke_lesion, add_stroke_lesions, lesion_shape_files
from uad.metrics import (
    auprc,
    auroc,
    best_dice,
    dice,
    histogram_edges,
    label_histograms,
    mean_interval,
    paired_difference_interval,
    pooled_intervals,
    slice_level_auroc,
    ssim_in_mask,
)
from uad.models import Prediction
from uad.models.base import predict_with_mask_mode
from uad.models.fusion import FusionConfig, FusionModel
from uad.options import MASK_SIZES_MM
from uad.postprocessing import erode_brain_mask, median_filter, segment_filtered
from uad.preprocessing import WORKING_GRID, ants
from uad.synthetic import add_synthetic_anomaly

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 3  # part of the result-cache key: bump when a protocol changes
# Protocols whose stored results gained something since: a cached result of an older revision re-runs that protocol
# alone (from the cached predictions), not every protocol of the model. 2: bootstrap draws for paired differences.
PROTOCOL_REVISIONS = {"synthetic": 2, "stroke": 2, "small_stroke": 2, "many_small": 2}
SPACING = (2.0, 2.0, 2.0)
# (case folder under data/lesion, contrast file, brain mask file or None). T1 first: the main table.
T1_CASES = (("mslub/patient26", "T1", None), ("tcga/TCGA-DU-7294", "T1", None))
OTHER_CONTRAST_CASES = (
    ("mslub/patient26", "T2", None), ("mslub/patient26", "FLAIR", None),
    ("tcga/TCGA-DU-7294", "T2", None), ("tcga/TCGA-DU-7294", "FLAIR", None),
    # BraTS 2015 intensities are z-scored with a non-zero background: the brain mask comes with them.
    ("brats2015/pat0005", "FLAIR", "brainmask"), ("brats2015/pat0006", "FLAIR", "brainmask"),
)


@dataclass(frozen=True)
class EvaluationConfig:
    data_dir: str
    models: tuple[str, ...]
    cache_dir: str
    out: str = "BENCHMARKS.md"
    seed: int = 0
    copies_per_scan: int = 4  # anomalies per held-out scan (one per copy): 120 cases keep the intervals narrow
    figure: str = "Resources/model-comparison.png"
    results_json: str = "Resources/evaluation-results.json"  # the figures in machine-readable form (model cards)
    mask_sizes_mm: tuple[int, ...] = MASK_SIZES_MM  # masking models are evaluated once per size listed here


@dataclass(frozen=True)
class Variant:
    """One row of the tables: a checkpoint at one mask size and mask mode (masking models appear once per size and
    per mode they are calibrated for)."""

    checkpoint: Checkpoint
    checkpoint_path: Path
    mask_size_mm: int | None
    mask_mode: str = "sliding"
    predictions_dir: str | None = None  # where fusion members' predictions are kept (see stored_predict)

    @property
    def label(self) -> str:
        settings = [f"{self.mask_size_mm} mm"] if self.mask_size_mm else []
        settings += [self.mask_mode] if self.mask_mode != "sliding" else []
        return f"{self.checkpoint.name} ({', '.join(settings)})" if settings else self.checkpoint.name

    @property
    def postprocessing(self):
        return self.checkpoint.calibrated_postprocessing(self.mask_size_mm, self.mask_mode)

    def predict(self, image: np.ndarray, mask: np.ndarray):
        px = self.checkpoint.preprocessing.mask_size_px(self.mask_size_mm) if self.mask_size_mm else None
        model = self.checkpoint.model
        if isinstance(model, FusionModel):  # its members' maps of the same case are usually computed already
            predictions = [stored_predict(member, sha, image, mask, px, self.predictions_dir)
                           for member, sha in zip(model.load_members(), model.member_files)]
            return model.combine(predictions, image, mask)
        if self.predictions_dir and model.config.name in _STORED_MODELS:
            return stored_predict(model, self.checkpoint.sha256, image, mask, px, self.predictions_dir)
        return predict_with_mask_mode(model, image, mask, px, self.mask_mode)

    def filtered(self, prediction, mask: np.ndarray) -> np.ndarray:
        return median_filter(prediction.anomaly_map, mask, SPACING, self.postprocessing.median_mm)


# Every protocol gives every model the same cases, and a fusion model's members are models evaluated too: the
# members' predictions are stored (keyed by weights SHA-256 and the case's bytes, ~7 MB each, in the evaluation
# cache), so a fusion costs no extra network or retrieval pass, even when evaluated in another run.
_STORED_MODELS = set(FusionConfig().members)


def stored_predict(model, sha256: str, image: np.ndarray, mask: np.ndarray, mask_size_px: int | None,
                   folder: str | None) -> Prediction:
    """``model``'s prediction of the case, read from ``folder`` where it was made before (computed and kept there
    otherwise; ``folder`` None: computed every time)."""
    if folder is None:
        return model.predict(image, mask, mask_size_px=mask_size_px)
    case = hashlib.sha1(image.tobytes() + mask.tobytes()).hexdigest()[:20]
    path = Path(folder) / f"{sha256[:16]}-{mask_size_px}-{case}.npz"
    if path.exists():
        with np.load(path) as arrays:
            return Prediction(**{key: arrays[key] for key in ("reconstruction", "residual", "anomaly_map")})
    prediction = model.predict(image, mask, mask_size_px=mask_size_px)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, reconstruction=prediction.reconstruction, residual=prediction.residual,
             anomaly_map=prediction.anomaly_map)
    tmp.replace(path)
    return prediction


def variants_of(checkpoint: Checkpoint, path: Path, mask_sizes_mm=MASK_SIZES_MM,
                predictions_dir: str | None = None) -> list[Variant]:
    """The largest (default, 64 mm) mask first: it is the one the figure uses. Then one more row per mask mode
    other than ``sliding`` that the checkpoint has a calibrated threshold for."""
    sizes = sorted(mask_sizes_mm, reverse=True) if checkpoint.model.uses_mask_size else [None]
    calibrated_modes = checkpoint.calibration.get("threshold_by_mask_mode", {})
    modes = ["sliding", *[mode for mode in checkpoint.model.mask_modes if mode in calibrated_modes]]
    return [Variant(checkpoint, path, mm, mode, predictions_dir) for mode in modes for mm in sizes]


def working_grid_slice_scores(variant: Variant, prediction, filtered: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per axial slice of the working grid: the model's own score, else (as ``uad detect`` reports) the 99th
    percentile of the map inside the eroded brain, where segmentation may flag."""
    if prediction.slice_scores is not None:
        return prediction.slice_scores
    region = erode_brain_mask(mask, SPACING, variant.postprocessing.brain_erosion_mm)
    return np.array([np.percentile(filtered[..., k][region[..., k]], 99) if region[..., k].any() else 0.0
                     for k in range(mask.shape[2])])


def placement_mask(grid=WORKING_GRID, erosion_mm: float = 4.0) -> np.ndarray:
    """Where synthetic anomalies are centred: the MNI152 brain mask on the working grid, eroded by ``erosion_mm``.

    A fixed array (no registration involved), so every run and every machine places the same anomalies. Eroded
    so that a centre lies inside every subject's brain; the ground truth is the shape inside the subject's own mask.
    """
    reference = grid.reference_image()
    template = ants.resample_image_to_target(resources.template_image("mni_brainmask"), reference).numpy() > 0.5
    return erode_brain_mask(template, (grid.spacing,) * 3, erosion_mm)


def _pooled_with_intervals(scores_per_subject: list[np.ndarray], labels_per_subject: list[np.ndarray],
                           rare_lesions: bool = False) -> dict:
    """Exact pooled AUROC / AUPRC over every subject's voxels, with 95 % bootstrap intervals over subjects.

    The intervals come from histograms binned at quantiles of all scores; with ``rare_lesions`` also at quantiles
    of the lesion voxels' scores: small lesions are a few voxels in ten thousand, all inside the top bins of the
    first kind, where a bin's ties hide their ranking (an interval could then miss its own pooled figure).
    """
    pooled_scores, pooled_labels = np.concatenate(scores_per_subject), np.concatenate(labels_per_subject)
    edges = histogram_edges(pooled_scores)
    if rare_lesions:
        edges = np.union1d(edges, histogram_edges(pooled_scores[pooled_labels != 0], 1024))
    histograms = np.stack([label_histograms(s, lab, edges) for s, lab in zip(scores_per_subject, labels_per_subject)])
    return {"auroc": auroc(pooled_scores, pooled_labels), "auprc": auprc(pooled_scores, pooled_labels),
            **pooled_intervals(histograms)}


def evaluate_synthetic(variant: Variant, ixi_test: dict, mass: dict, seed: int, copies: int,
                       centres_from: np.ndarray | None = None) -> dict:
    post = variant.postprocessing

    def healthy(cohort: dict) -> tuple[list[float], list[float]]:
        """SSIM and the volume (ml) the default segmentation flags, per healthy scan: every flagged voxel is false."""
        ssims, flagged_ml = [], []
        for image, mask in cohort.values():
            prediction = variant.predict(image, mask)
            ssims.append(ssim_in_mask(image, prediction.reconstruction, mask, data_range=1.0))
            segmentation = segment_filtered(variant.filtered(prediction, mask), mask, SPACING, post)
            flagged_ml.append(float(segmentation.sum()) * np.prod(SPACING) / 1000)
        return ssims, flagged_ml

    per_volume_auroc, per_volume_auprc, subject_dices, subject_scores, subject_labels = [], [], [], [], []
    for subject_id, (image, mask) in tqdm(ixi_test.items(), desc=f"synthetic {variant.label}", file=sys.stderr):
        rng = np.random.default_rng([seed, zlib.crc32(subject_id.encode())])  # same anomalies for every model
        dices, scores, labels = [], [], []
        for _ in range(copies):
            modified, truth = add_synthetic_anomaly(image, mask, rng, spacing_mm=SPACING[0], centres_from=centres_from)
            filtered = variant.filtered(variant.predict(modified, mask), mask)
            per_volume_auroc.append(auroc(filtered, truth, mask))
            per_volume_auprc.append(auprc(filtered, truth, mask))
            dices.append(dice(segment_filtered(filtered, mask, SPACING, post), truth))
            scores.append(filtered[mask])
            labels.append(truth[mask])
        subject_dices.append(np.mean(dices))
        subject_scores.append(np.concatenate(scores))
        subject_labels.append(np.concatenate(labels))
    pooled = _pooled_with_intervals(subject_scores, subject_labels)
    (ixi_ssim, ixi_flagged), (mass_ssim, mass_flagged) = healthy(ixi_test), healthy(mass)
    return {
        "ssim_ixi": float(np.mean(ixi_ssim)),
        "ssim_ixi_ci": mean_interval(ixi_ssim),
        "ssim_mass": float(np.mean(mass_ssim)) if mass_ssim else float("nan"),
        "flagged_ml_ixi": float(np.mean(ixi_flagged)),
        "flagged_ml_mass": float(np.mean(mass_flagged)) if mass_flagged else float("nan"),
        "flagged_ml_mass_ci": mean_interval(mass_flagged) if mass_flagged else [float("nan")] * 2,
        "auroc_mean": float(np.nanmean(per_volume_auroc)),
        "auprc_mean": float(np.nanmean(per_volume_auprc)),
        "auroc_pooled": pooled["auroc"],
        "auprc_pooled": pooled["auprc"],
        "auroc_pooled_ci": pooled["auroc_ci"],
        "auprc_pooled_ci": pooled["auprc_ci"],
        "auroc_pooled_draws": pooled["auroc_draws"],
        "auprc_pooled_draws": pooled["auprc_draws"],
        "dice_mean": float(np.mean(subject_dices)),
        "dice_mean_ci": mean_interval(subject_dices),
        "threshold": post.threshold,
        "cases": len(per_volume_auroc),
        "n_ixi": len(ixi_test),
        "n_mass": len(mass),
    }


@dataclass(frozen=True)
class ShapeDraw:
    """Which stroke shapes a protocol paints, how many per scan, from which random stream."""

    volume_ml: tuple[float, float]
    per_scan: int
    stream: int
    # Lesion voxels a few in ten thousand, above every coarse quantile of the scores: the oracle Dice then searches
    # every score (not 200 quantiles) and the intervals' bins follow the lesion voxels' scores too.
    rare: bool = False
    lesions_per_case: tuple[int, int] = (1, 1)  # painted into the same scan: from, to (inclusive)


STROKE_SHAPES = ShapeDraw((1.0, np.inf), per_scan=1, stream=7)
SMALL_SHAPES = ShapeDraw((0.15, 1.0), per_scan=2, stream=13, rare=True)  # the size of most MS lesions
# As in multiple sclerosis, many small lesions in one scan: a segmentation that keeps only its few most anomalous
# components (top-K) is measured here, not by one lesion per case.
MANY_SMALL_SHAPES = ShapeDraw((0.1, 1.5), per_scan=1, stream=17, rare=True, lesions_per_case=(8, 24))
SHAPE_DRAWS = {"stroke": STROKE_SHAPES, "small_stroke": SMALL_SHAPES, "many_small": MANY_SMALL_SHAPES}
_painted: dict = {}  # (subject, its image, seed, draw) -> its cases: painted once per run, the same for every model


def painted_cases(subject_id: str, image: np.ndarray, mask: np.ndarray, shapes: list[Path], seed: int,
                  draw: ShapeDraw) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, truth) of each of a test scan's lesion-shape cases; resampling the shapes is the slow part."""
    key = (subject_id, zlib.crc32(image.tobytes()), seed, draw)
    if key not in _painted:
        rng = np.random.default_rng([seed, draw.stream, zlib.crc32(subject_id.encode())])
        cases = []
        for _ in range(draw.per_scan):
            low, high = draw.lesions_per_case
            # A fixed count draws nothing, so the one-lesion protocols keep the lesions (and cached results) they had.
            count = int(rng.integers(low, high + 1)) if high > low else low
            cases.append(add_stroke_lesions(image, mask, rng, shapes, count, *draw.volume_ml, spacing_mm=SPACING[0]))
        _painted[key] = cases
    return _painted[key]


def evaluate_stroke_shapes(variant: Variant, ixi_test: dict, shapes: list[Path], seed: int,
                           draw: ShapeDraw = STROKE_SHAPES) -> dict:
    post = variant.postprocessing
    dices, scores, labels, slice_scores, slice_labels = [], [], [], [], []
    for subject_id, (image, mask) in tqdm(ixi_test.items(), desc=f"stroke shapes {variant.label}", file=sys.stderr):
        has_brain = mask.any(axis=(0, 1))
        for modified, truth in painted_cases(subject_id, image, mask, shapes, seed, draw):
            prediction = variant.predict(modified, mask)
            filtered = variant.filtered(prediction, mask)
            dices.append(dice(segment_filtered(filtered, mask, SPACING, post), truth))
            scores.append(filtered[mask])
            labels.append(truth[mask])
            slice_scores.append(working_grid_slice_scores(variant, prediction, filtered, mask)[has_brain])
            slice_labels.append(truth.any(axis=(0, 1))[has_brain])
    if draw.per_scan > 1:  # intervals over subjects: a subject's cases are resampled together
        scores = [np.concatenate(scores[i:i + draw.per_scan]) for i in range(0, len(scores), draw.per_scan)]
        labels = [np.concatenate(labels[i:i + draw.per_scan]) for i in range(0, len(labels), draw.per_scan)]
    pooled = _pooled_with_intervals(scores, labels, rare_lesions=draw.rare)
    pooled_scores, pooled_labels = np.concatenate(scores), np.concatenate(labels)
    return {
        "auroc": pooled["auroc"],
        "auprc": pooled["auprc"],
        "auroc_ci": pooled["auroc_ci"],
        "auprc_ci": pooled["auprc_ci"],
        "auroc_draws": pooled["auroc_draws"],
        "auprc_draws": pooled["auprc_draws"],
        "dice_mean": float(np.mean(dices)),
        "dice_mean_ci": mean_interval(dices),
        "best_dice": best_dice(pooled_scores, pooled_labels, n_thresholds=None if draw.rare else 200)[0],
        "slice_auroc": slice_level_auroc(np.concatenate(slice_scores), np.concatenate(slice_labels)),
        "cases": len(dices),
    }


def evaluate_lesion_cases(variant: Variant, data_dir: Path, cases) -> dict[str, dict]:
    """Each case through ``uad detect`` end to end; scored in its own grid over the brain mask detect used."""
    results: dict[str, dict] = {}
    for case, contrast, brain_mask_name in cases:
        folder = data_dir / "lesion" / case
        scan_path = folder / f"{contrast}.nii.gz"
        if not scan_path.exists():
            continue
        brain_mask = str(folder / f"{brain_mask_name}.nii.gz") if brain_mask_name else None
        detector = Detector(DetectOptions(model=str(variant.checkpoint_path), device="cpu", skull_stripped=True,
                                          brain_mask=brain_mask, mask_size=variant.mask_size_mm,
                                          mask_mode=variant.mask_mode))
        with tempfile.TemporaryDirectory(prefix="uad-eval-") as out:
            try:
                report = detector.run(scan_path, out).report
            except UserInputError as error:  # reported in the table; the other cases still count
                results[f"{case} {contrast}"] = {"error": str(error)}
                continue
            # nibabel, not load_volume: an empty segmentation is a valid output here, not a bad input
            anomaly_map, segmentation, brain = (np.asanyarray(nib.load(Path(out) / f"{n}.nii.gz").dataobj) for n in
                                                ("anomaly_map", "segmentation", "brain_mask"))
        scan = load_volume(scan_path)
        truth = load_volume(folder / "lesion_mask.nii.gz", what="lesion mask").data > 0
        brain = brain > 0
        axis, reversed_order = superior_axis(scan.affine)
        slice_truth = np.moveaxis(truth & brain, axis, 0).reshape(truth.shape[axis], -1).any(axis=1)
        slice_truth = slice_truth[::-1] if reversed_order else slice_truth
        scores = np.array([np.nan if s is None else s for s in report["slice_scores"]])
        has_brain = ~np.isnan(scores)
        filtered = median_filter(anomaly_map, brain, scan.spacing, detector.postprocessing.median_mm)
        results[f"{case} {contrast}"] = {
            "dice": dice(segmentation > 0, truth),
            "best_dice": best_dice(filtered, truth, brain, n_thresholds=200)[0],
            "auprc": auprc(anomaly_map, truth, brain),
            "auroc": auroc(anomaly_map, truth, brain),
            "slice_auroc": slice_level_auroc(scores[has_brain], slice_truth[has_brain]),
            "slice_scores": scores[has_brain].tolist(),
            "slice_truth": slice_truth[has_brain].tolist(),
            "flagged_ml": report["segmented_volume_ml"],
            "lesion_ml": float(truth.sum() * np.prod(scan.spacing)) / 1000,
        }
    return results


PROTOCOLS = ("synthetic", "stroke", "small_stroke", "many_small", "lesions", "other_contrasts",
             "site_calibration")


def evaluate_site_calibration(variant: Variant, site: dict, shapes: list[Path], seed: int) -> dict:
    """Another site's healthy scans set that site's own threshold, as ``uad calibrate`` does for a clinic.

    The scans are split in two halves; each half's threshold (the bundled false-positive rate, on its clean maps)
    is measured on the other half: the volume flagged on the clean scans (all false) and the Dice of one stroke
    shape painted into each, next to the same figures at the bundled threshold (from IXI validation scans).
    """
    if len(site) < 2:
        return {}
    post = variant.postprocessing
    fpr = variant.checkpoint.calibration.get("fpr", 0.01)
    voxel_ml = float(np.prod(SPACING)) / 1000
    clean, lesioned = {}, {}
    for subject_id, (image, mask) in tqdm(sorted(site.items()), desc=f"site calibration {variant.label}",
                                          file=sys.stderr):
        clean[subject_id] = variant.filtered(variant.predict(image, mask), mask)
        rng = np.random.default_rng([seed, 11, zlib.crc32(subject_id.encode())])  # same lesions for every model
        modified, truth, _ = add_stroke_lesion(image, mask, rng, shapes)
        lesioned[subject_id] = (variant.filtered(variant.predict(modified, mask), mask), truth)
    ids = sorted(site)
    halves = (ids[0::2], ids[1::2])
    thresholds, figures = [], {"flagged_ml": ([], []), "dice": ([], [])}  # (bundled, site) per measured scan
    for calibrate_on, measure_on in (halves, halves[::-1]):
        threshold, _ = healthy_threshold([clean[i] for i in calibrate_on], [site[i][1] for i in calibrate_on],
                                         post, fpr, SPACING)
        thresholds.append(threshold)
        for subject_id in measure_on:
            mask = site[subject_id][1]
            filtered, truth = lesioned[subject_id]
            for column, config in enumerate((post, replace(post, threshold=threshold))):
                flagged = segment_filtered(clean[subject_id], mask, SPACING, config)
                figures["flagged_ml"][column].append(float(flagged.sum()) * voxel_ml)
                figures["dice"][column].append(dice(segment_filtered(filtered, mask, SPACING, config), truth))
    result = {"threshold": post.threshold, "site_thresholds": thresholds, "n_site": len(site)}
    for key, (bundled, own) in figures.items():
        for name, values in (("bundled", bundled), ("site", own)):
            result[f"{key}_{name}"] = float(np.mean(values))
            result[f"{key}_{name}_ci"] = mean_interval(values)
    return result


@dataclass(frozen=True)
class HeldOut:
    """What the protocols run on: never a training subject."""

    data_dir: Path
    ixi_test: dict  # subject id -> (image, mask) on the working grid
    mass: dict
    shapes: list[Path]
    centres_from: np.ndarray | None = None  # where synthetic anomalies are centred (placement_mask)


def run_protocol(protocol: str, variant: Variant, held_out: HeldOut, config: EvaluationConfig) -> dict:
    if protocol in ("synthetic", "site_calibration") and variant.checkpoint.model.keeps_stage_one_map:
        # Same map and (calibrated on the same data) the same threshold as stage 1: the same figures; not re-run.
        return {"same_as_stage_one": variant.checkpoint.training.get("initialised_from", {}).get("model", "?")}
    if protocol == "synthetic":
        return evaluate_synthetic(variant, held_out.ixi_test, held_out.mass, config.seed, config.copies_per_scan,
                                  held_out.centres_from)
    if protocol == "site_calibration":
        return evaluate_site_calibration(variant, held_out.mass, held_out.shapes, config.seed) if held_out.shapes \
            else {}
    if protocol in SHAPE_DRAWS:
        return evaluate_stroke_shapes(variant, held_out.ixi_test, held_out.shapes, config.seed,
                                      SHAPE_DRAWS[protocol]) if held_out.shapes else {}
    cases = T1_CASES if protocol == "lesions" else OTHER_CONTRAST_CASES
    return evaluate_lesion_cases(variant, held_out.data_dir, cases)


def evaluate(config: EvaluationConfig) -> dict[str, dict]:
    data = Path(config.data_dir)
    ixi_dir, mass_dir = data / "healthy/ixi_t1", data / "healthy/mass_t1"
    split = split_subjects([s.subject_id for s in find_subjects(ixi_dir)])
    shapes = lesion_shape_files(data / "lesion_shapes/soop_stroke_mni")
    results: dict[str, dict] = {}
    figure_columns = []
    for name in config.models:
        path = resolve_checkpoint_path(name)
        checkpoint = load_checkpoint(path)
        trained_on = set(checkpoint.training.get("subjects", {}).get("train", []))
        test_ids = set(split.test) - trained_on  # never evaluate on training subjects
        ixi_test = _cohort(ixi_dir, test_ids, checkpoint, config.cache_dir, skull_stripped=False)
        mass = _cohort(mass_dir, None, checkpoint, config.cache_dir, skull_stripped=True) if mass_dir.is_dir() else {}
        held_out = HeldOut(data, ixi_test, mass, shapes, placement_mask(checkpoint.preprocessing.working_grid))
        predictions_dir = str(Path(config.cache_dir) / "predictions")
        for variant in variants_of(checkpoint, path, config.mask_sizes_mm, predictions_dir):
            cache_path = _result_cache_path(config, variant)
            result = json.loads(cache_path.read_text()) if cache_path.exists() else {}
            for protocol in PROTOCOLS:
                # Each protocol is kept as soon as it is done: an interrupted run resumes.
                stale = result.get(protocol, {}).get("revision", 1) < PROTOCOL_REVISIONS.get(protocol, 1)
                if protocol not in result or stale:
                    result[protocol] = run_protocol(protocol, variant, held_out, config)
                    if protocol in PROTOCOL_REVISIONS and result[protocol]:
                        result[protocol]["revision"] = PROTOCOL_REVISIONS[protocol]
                    _write_json(cache_path, result)
            results[variant.label] = result
        figure_columns.append(_figure_column(variants_of(checkpoint, path, config.mask_sizes_mm, predictions_dir)[0],
                                             ixi_test,
                                             config.seed, held_out.centres_from))
    if figure_columns and config.figure:
        save_model_comparison(config.figure, figure_columns)
    if config.results_json:
        Path(config.results_json).write_text(json.dumps(_without_long_lists(results), indent=1) + "\n")
    figure_labels = [column["label"] for column in figure_columns]
    for section, markdown in _markdown(results, config, figure_labels).items():
        update_section(config.out, section, markdown)
    return results


def _cohort(folder: Path, ids: set[str] | None, checkpoint: Checkpoint, cache_dir: str, skull_stripped: bool):
    subjects = [s for s in find_subjects(folder) if ids is None or s.subject_id in ids]
    cached = prepare_cohort(subjects, checkpoint.preprocessing, cache_dir, skull_stripped=skull_stripped)
    return {sid: load_cached(path) for sid, path in sorted(cached.items())}


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


LONG_LISTS = ("slice_scores", "slice_truth", "auroc_draws", "auprc_draws", "auroc_pooled_draws", "auprc_pooled_draws")


def _without_long_lists(results: dict) -> dict:
    """Results minus the per-slice scores and bootstrap draws (kept in the cache for pooling and paired
    comparisons, too long to publish)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in LONG_LISTS}
        return value
    return strip(results)


def _result_cache_path(config: EvaluationConfig, variant: Variant) -> Path:
    """One variant's results are computed once per weights file, protocol version, seed and data folder."""
    key = zlib.crc32(f"{Path(config.data_dir).resolve()}|{config.copies_per_scan}".encode())
    mode = "" if variant.mask_mode == "sliding" else f"-{variant.mask_mode}"  # sliding keeps its cached names
    name = (f"{variant.checkpoint.sha256[:16]}-{variant.mask_size_mm}{mode}-v{PROTOCOL_VERSION}-s{config.seed}-"
            f"{key:08x}")
    return Path(config.cache_dir) / "evaluation" / f"{name}.json"


def _figure_column(variant: Variant, ixi_test: dict, seed: int, centres_from: np.ndarray | None) -> dict:
    """Malé et al. Figure 2: the first held-out scan, clean and with a synthetic anomaly, through this model."""
    subject_id, (image, mask) = next(iter(ixi_test.items()))
    rng = np.random.default_rng([seed, zlib.crc32(subject_id.encode())])
    modified, truth = add_synthetic_anomaly(image, mask, rng, spacing_mm=SPACING[0], centres_from=centres_from)
    k = int(np.argmax(truth.sum(axis=(0, 1))))  # the axial slice through the anomaly's largest section
    threshold = variant.postprocessing.threshold
    column = {"label": variant.label, "slice": k, "threshold": threshold, "healthy_image": image[..., k],
              "abnormal_image": modified[..., k], "brain": mask[..., k], "truth": truth[..., k]}
    for row, scan in (("healthy", image), ("abnormal", modified)):
        prediction = variant.predict(scan, mask)
        column[f"{row}_reconstruction"] = prediction.reconstruction[..., k]
        column[f"{row}_map"] = variant.filtered(prediction, mask)[..., k]
    return column


def _markdown(results: dict[str, dict], config: EvaluationConfig, figure_labels: list[str]) -> dict[str, str]:
    sizes = "" if tuple(config.mask_sizes_mm) == MASK_SIZES_MM else \
        f" --mask-sizes {' '.join(map(str, config.mask_sizes_mm))}"
    command = f"`uad evaluate --data {config.data_dir} --models {' '.join(config.models)}{sizes}` (seed {config.seed})"
    provenance = [f"Command: {command}.", f"Hardware and date: {hardware_line()}.", ""]
    return {
        "synthetic": _synthetic_markdown(results, provenance, config),
        "stroke-shapes": _stroke_markdown(results, provenance),
        "small-lesion-shapes": _stroke_markdown(results, provenance, "small_stroke"),
        "many-small-lesion-shapes": _stroke_markdown(results, provenance, "many_small"),
        "site-calibration": _site_markdown(results, provenance),
        "real-lesions": _lesion_markdown(results, provenance, "lesions", "Real lesions, T1 (EVALUATION.md protocol 3)"),
        "cross-contrast": _lesion_markdown(results, provenance, "other_contrasts",
                                           "Cross-contrast: the T1-trained models on T2 and FLAIR"),
        "published": PUBLISHED,
        "model-comparison": "\n".join([
            "## Reconstructions and maps side by side (Malé et al. Figure 2)",
            "",
            f"Written by {command}: the first held-out IXI test scan, clean (top rows) and with a synthetic "
            "anomaly (bottom row, its outline in green on the input), one axial slice through the anomaly. First "
            "column: the input; then, per model, its reconstruction and its filtered anomaly map over the "
            "input, shown from half to twice the model's calibrated threshold (so a colour means the same for every "
            f"model). Models, left to right: {', '.join(figure_labels)}.",
            "",
            f"![model comparison]({config.figure})",
        ]),
    }


def _synthetic_markdown(results: dict[str, dict], provenance: list[str], config: EvaluationConfig) -> str:
    synthetic = {label: r["synthetic"] for label, r in results.items() if "same_as_stage_one" not in r["synthetic"]}
    shared = [f"`{label}`'s pixel map and threshold are those of its first stage "
              f"`{r['synthetic']['same_as_stage_one']}` (64 mm), so its synthetic figures are that row's "
              "(not recomputed)."
              for label, r in results.items() if "same_as_stage_one" in r["synthetic"]]
    baseline = synthetic.get("intensity")
    rows = []
    for label, r in synthetic.items():
        beats = "–" if baseline is None or label == "intensity" else (
            "yes" if all(beats_outside_intervals(r, baseline, f"{m}_pooled") for m in ("auroc", "auprc")) else "**no**")
        rows.append([label, r["ssim_ixi"], r["ssim_mass"], r["auroc_mean"], r["auprc_mean"],
                     with_interval(r, "auroc_pooled"), with_interval(r, "auprc_pooled"), with_interval(r, "dice_mean"),
                     f"{r['threshold']:.4g}", f"{r['flagged_ml_ixi']:.1f}", f"{r['flagged_ml_mass']:.1f}", beats,
                     paired_difference(r, baseline, ("auroc_pooled", "auprc_pooled"))])
    if not synthetic:
        return "\n".join(["## Synthetic anomalies (Malé et al. protocol; EVALUATION.md protocol 1)", "", *shared])
    first = next(iter(synthetic.values()))
    best_label = max(synthetic, key=lambda label: synthetic[label]["auprc_pooled"])
    best = synthetic[best_label]
    met = best["auroc_pooled"] >= TARGET_AUROC and best["auprc_pooled"] >= TARGET_AUPRC
    verdict = (f"Best model by pooled AUPRC: **{best_label}** (AUROC {with_interval(best, 'auroc_pooled')}, AUPRC "
               f"{with_interval(best, 'auprc_pooled')}, healthy IXI SSIM {best['ssim_ixi']:.3f}). The target of the "
               f"papers' best (Malé et al. VQ-VAE + Transformer: AUROC ≥ {TARGET_AUROC}, AUPRC ≥ {TARGET_AUPRC}) is "
               + ("met." if met else "**not met**."))
    return "\n".join([
        "## Synthetic anomalies (Malé et al. protocol; EVALUATION.md protocol 1)",
        "",
        *provenance,
        f"Data: held-out IXI test split ({first['n_ixi']} subjects, `uad.data.split_subjects` seed 0, never used for "
        f"training or calibration) and MASS ({first['n_mass']} skull-stripped healthy scans from another site). "
        f"{config.copies_per_scan} copies per IXI scan, each with one box or ellipsoid of 20–30 mm filled with a "
        f"uniform random intensity ({first['cases']} cases). Everything on the 2 mm working grid (MNI space), "
        "brain voxels only; maps filtered as each model segments them (5 mm median; the fusion, calibrated unfiltered, "
        "none). Masking models appear "
        "once per mask size, each with its own calibrated threshold.",
        "SSIM: inside the brain mask, intensities normalised to the brain's 99th percentile (data range 1); for "
        "masking models the reconstruction is the composite of the masked passes. AUROC/AUPRC: per-volume mean and "
        "pooled over all cases. Dice: segmentation at the model's calibrated threshold (1 % healthy-voxel FPR on "
        "validation subjects), default post-processing, mean over subjects. Intervals: 95 % bootstrap over subjects "
        "(1000 resamples, fixed seed). Beats intensity: the pooled AUROC and AUPRC intervals both lie entirely above "
        "the `intensity` baseline's on the same cases. Paired: the model's pooled AUROC and AUPRC minus "
        "`intensity`'s over the same 1000 resamples of the same subjects, and the 95 % interval of that difference "
        "(above 0: better on these subjects beyond the resampling noise).",
        "",
        table(["model", "SSIM IXI", "SSIM MASS", "AUROC (mean)", "AUPRC (mean)", "AUROC (pooled) [95 % CI]",
               "AUPRC (pooled) [95 % CI]", "Dice @ calibrated [95 % CI]", "threshold", "flagged ml, healthy IXI",
               "flagged ml, healthy MASS", "beats intensity", "paired Δ vs intensity: AUROC; AUPRC [95 % CI]"],
              rows),
        "",
        *shared,
        "",
        "Flagged ml: mean volume the default segmentation marks on the clean healthy scans (all of it false "
        "positive) — the same-site IXI test scans and the other-site MASS scans.",
        "",
        verdict,
    ])


TARGET_AUROC, TARGET_AUPRC = 0.94, 0.74  # Malé et al.'s best (VQ-VAE + Transformer), issue #9


def with_interval(result: dict, key: str) -> str:
    """``0.912 [0.897, 0.925]``: a figure and its 95 % interval when the result has one."""
    interval = result.get(f"{key}_ci")
    value = f"{result[key]:.3f}"
    return f"{value} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else value


def paired_difference(result: dict, baseline: dict | None, keys: tuple[str, ...]) -> str:
    """``+0.178 [+0.121, +0.236]`` per key, joined by "; ": ``result`` minus ``baseline`` and the paired interval of
    the difference, from their bootstrap draws. "–" for the baseline itself, without a baseline, or when either lacks
    draws (a result cached before they were kept)."""
    if baseline is None or result is baseline:
        return "–"
    figures = []
    for key in keys:
        draws, baseline_draws = result.get(f"{key}_draws"), baseline.get(f"{key}_draws")
        if not draws or not baseline_draws or len(draws) != len(baseline_draws):
            return "–"
        low, high = paired_difference_interval(draws, baseline_draws)
        figures.append(f"{result[key] - baseline[key]:+.3f} [{low:+.3f}, {high:+.3f}]")
    return "; ".join(figures)


def beats_outside_intervals(result: dict, baseline: dict, key: str) -> bool:
    """True when ``result``'s interval for ``key`` lies wholly above ``baseline``'s (a claim the noise can't make)."""
    return result[f"{key}_ci"][0] > baseline[f"{key}_ci"][1]


def _stroke_markdown(results: dict[str, dict], provenance: list[str], key: str = "stroke") -> str:
    stroke = {label: r[key] for label, r in results.items() if r.get(key)}
    title = {"stroke": "Realistic lesion shapes (EVALUATION.md protocol 2)",
             "small_stroke": "Small lesion shapes (protocol 2 with MS-sized lesions)",
             "many_small": "Many small lesion shapes in one scan (protocol 2, MS-like)"}[key]
    if not stroke:
        return f"## {title}\n\nNo lesion shapes found in the data folder."
    baseline = stroke.get("intensity")
    rows = [[label, with_interval(r, "auroc"), with_interval(r, "auprc"),
             paired_difference(r, baseline, ("auprc",)),
             with_interval(r, "dice_mean"), r["best_dice"], r["slice_auroc"]] for label, r in stroke.items()]
    cases = next(iter(stroke.values()))["cases"]
    drawn = {
        "stroke": f"One real stroke-lesion mask (SOOP, MNI space, ≥ 1 ml inside the brain) per held-out IXI test "
                  f"scan ({cases} cases",
        "small_stroke": f"Two real stroke-lesion masks of 0.15–1 ml inside the brain (the size of most MS lesions: "
                        f"19–125 voxels of the working grid) per held-out IXI test scan, one at a time ({cases} cases",
        "many_small": f"8 to 24 real stroke-lesion masks of 0.1–1.5 ml at once in each held-out IXI test scan (about "
                      f"as many and as large as the lesions of an MS scan; {cases} cases",
    }[key]
    rare = SHAPE_DRAWS[key].rare
    return "\n".join([
        f"## {title}",
        "",
        *provenance,
        f"{drawn}, the same lesions for every model), painted with the "
        "intensity of the scan's darkest 5 % of brain (CSF-like) over a softened 2 mm edge. Pooled voxel AUROC/AUPRC "
        "of the map as the model segments it (median-filtered, except the fusion's, which is calibrated unfiltered); "
        "Dice at the calibrated threshold (mean over cases); best Dice is the oracle "
        f"over {'every score' if rare else '200 quantiles'} of the pooled map (an upper bound that peeks at the "
        "labels); slice AUROC (Georgescu) "
        "over the working grid's axial slices with brain, pooled over cases, scored by the model's own slice score "
        "where it has one (mae-classifier), else by the 99th percentile of the map in the slice. Paired Δ: the "
        "model's pooled AUPRC minus `intensity`'s, with the 95 % interval of that difference over the same bootstrap "
        "resamples of the same subjects.",
        "",
        table(["model", "AUROC [95 % CI]", "AUPRC [95 % CI]", "paired Δ AUPRC vs intensity [95 % CI]",
               "Dice @ calibrated [95 % CI]", "best Dice (oracle)", "slice AUROC"], rows),
    ])


def _site_markdown(results: dict[str, dict], provenance: list[str]) -> str:
    site = {label: r["site_calibration"] for label, r in results.items()
            if r.get("site_calibration", {}).get("site_thresholds")}
    if not site:
        return "## Another site's own threshold\n\nNo other-site healthy scans (or lesion shapes) in the data folder."
    figures = ("flagged_ml_bundled", "flagged_ml_site", "dice_bundled", "dice_site")
    rows = [[label, f"{r['threshold']:.3f}", " / ".join(f"{t:.3f}" for t in r["site_thresholds"]),
             *(with_interval(r, key) for key in figures)] for label, r in site.items()]
    return "\n".join([
        "## Another site's own threshold (`uad calibrate` on its healthy scans)",
        "",
        *provenance,
        f"The {next(iter(site.values()))['n_site']} healthy MASS scans (another site, skull-stripped) in two halves "
        "(alternating in sorted order); each half's threshold (the bundled healthy-voxel FPR, on its clean maps, "
        "as `uad calibrate --data SITE_SCANS --skull-stripped` sets it) is measured on the other half, and so is "
        "the bundled threshold (IXI validation scans): the volume flagged on the clean scans (every voxel false), "
        "and the Dice of one stroke shape (≥ 1 ml, painted as in protocol 2) per scan. Mean over all the measured "
        "scans (each half once); intervals: 95 % bootstrap over scans.",
        "",
        table(["model", "bundled threshold", "site thresholds (halves)", "flagged ml, bundled [95 % CI]",
               "flagged ml, site [95 % CI]", "stroke Dice, bundled [95 % CI]", "stroke Dice, site [95 % CI]"], rows),
    ])


def _lesion_markdown(results: dict[str, dict], provenance: list[str], key: str, title: str) -> str:
    rows, pooled = [], []
    for label, r in results.items():
        cases = r.get(key, {})
        for case, c in cases.items():
            if "error" in c:
                rows.append([label, case, "failed: " + c["error"], *["–"] * 6])
                continue
            rows.append([label, case, c["lesion_ml"], c["flagged_ml"], c["dice"], c["best_dice"], c["auprc"],
                         c["auroc"], c["slice_auroc"]])
        scored = [c for c in cases.values() if "error" not in c]
        if scored:
            scores = np.concatenate([c["slice_scores"] for c in scored])
            truth = np.concatenate([c["slice_truth"] for c in scored]).astype(bool)
            pooled.append([label, len(scored), len(scores), int(truth.sum()), slice_level_auroc(scores, truth)])
    if not rows:
        return f"## {title}\n\nNo such cases in the data folder."
    return "\n".join([
        f"## {title}",
        "",
        *provenance,
        "Each case goes through `uad detect` end to end (`--skull-stripped`: all are distributed stripped; BraTS "
        "2015 with its own brain mask, since its background is not 0) and is scored in its own 1 mm grid over the "
        "brain mask detect used. Dice at the calibrated threshold with default post-processing; best Dice is the "
        "oracle over 200 thresholds of the (median-)filtered map, before the erosion and component steps (so it can "
        "fall below the post-processed Dice; not achievable without lesion data); AUPRC/AUROC over brain voxels of "
        "the anomaly map; slice AUROC (Georgescu) over axial slices with brain, a slice being abnormal when it "
        "holds any lesion voxel, scored by the report's slice score. A handful of cases: a check on real "
        "pathology, not a benchmark.",
        "",
        table(["model", "case", "lesion ml", "flagged ml", "Dice @ calibrated", "best Dice (oracle)", "AUPRC",
               "AUROC", "slice AUROC"], rows),
        "",
        "Slice AUROC pooled over the cases above (all their brain slices together):",
        "",
        table(["model", "cases", "slices", "abnormal slices", "slice AUROC (pooled)"], pooled),
    ])


PUBLISHED_ROWS = [
    ["Malé et al. Table 2", "VQ-VAE", "HCP-trained 2D, synthetic boxes/ellipses", "SSIM 0.96, AUROC 0.80, AUPRC 0.28",
     "synthetic: vqvae"],
    ["Malé et al. Table 2", "Swin-MAE", "same", "SSIM 0.78–0.84, AUROC 0.88, AUPRC 0.38", "synthetic: swin-mae"],
    ["Malé et al. Table 2", "Reverse AE", "same", "SSIM 0.55–0.63, AUROC 0.95, AUPRC 0.67", "synthetic: rae"],
    ["Malé et al. Table 2", "VQ-VAE + Transformer", "same", "SSIM 0.93, AUROC 0.94, AUPRC 0.74",
     "synthetic: vqvae-transformer"],
    ["Georgescu Table 1", "MAE + classifier", "BraTS2020, slice level", "slice AUROC 0.899",
     "slice AUROC of mae-classifier (real lesions, stroke shapes)"],
    ["Rashmi et al. Table 1", "Ano-swinMAE 32×32", "IXI T2-trained, MSLUB T2", "Dice 19.78 %, AUPRC 12.78 %",
     "cross-contrast: swin-mae (32 mm), mslub T2"],
    ["Rashmi et al. Table 1", "Ano-swinMAE 64×64", "IXI T2-trained, BraTS21 T2", "Dice 42.92 %, AUPRC 30.24 %",
     "cross-contrast: swin-mae (64 mm), tcga T2"],
    ["Rashmi et al. Table 2", "Ano-swinMAE 64×64", "IXI T1-trained, BraTS21 T2", "Dice 38.99 %, AUPRC 27.19 %",
     "cross-contrast: swin-mae (64 mm), tcga T2"],
]
PUBLISHED = "## Published figures beside ours (different data and protocols: compare with care)\n\n" + table(
    ["paper", "model", "protocol", "published", "our closest row"], PUBLISHED_ROWS) + """

How ours differ: we train on 105 IXI T1 subjects (not HCP, not T2), for minutes to an hour on a 2-core CPU
(the papers: hundreds to 1000 epochs on V100/A100 GPUs), at 2 mm (80 × 96 axial slices; the papers: 1 mm,
128–240 px); our maps are z-scored against healthy voxel statistics and median-filtered in 3D; our real-lesion
rows are a handful of cases, not the papers' test sets; Malé's synthetic anomalies are 2D and ours are 3D."""
