"""``uad detect``: one scan in, reconstruction + anomaly map + segmentation out, on the input's own grid.

A :class:`Detector` loads its model once and can run many scans (cohort mode). Outputs are written to a
staging folder beside ``out_dir`` and moved in only when everything succeeded, so a failed or interrupted
run leaves nothing half-written in ``out_dir``; the input file is only ever read.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

import uad
from uad import catalog
from uad.checkpoint import Checkpoint, load_checkpoint
from uad.devices import resolve_device
from uad.errors import UserInputError
from uad.figures import save_overview
from uad.input_check import decide_skull_stripping
from uad.input_check import measure as check_preprocessed
from uad.io import Volume, check_output_folder, load_volume, save_volume, unwritable_error
from uad.models.base import predict_with_mask_mode
from uad.options import DEFAULT_MASK_SIZE_MM, MASK_MODES, MASK_SIZES_MM
from uad.postprocessing import (
    FINDING_COLUMNS,
    Finding,
    PostprocessConfig,
    erode_brain_mask,
    find_components,
    median_filter,
    segment_filtered,
)
from uad.preprocessing import preprocess
from uad.progress import Progress

log = logging.getLogger(__name__)

OUTPUT_FILES = (
    "reconstruction.nii.gz",
    "residual.nii.gz",
    "anomaly_map.nii.gz",
    "segmentation.nii.gz",
    "brain_mask.nii.gz",
    "report.json",
    "findings.csv",
    "overview.png",
)
STAGE_WEIGHTS = {"load": 0.05, "preprocessing": 0.25, "registration": 0.1, "inference": 0.35,
                 "postprocessing": 0.15, "writing": 0.1}


@dataclass(frozen=True)
class DetectOptions:
    """Everything ``uad detect`` can be told; ``None`` means "the model's calibrated default"."""

    model: str | None = None  # a bundled model name, or a checkpoint path with manifest.json beside it
    mask_size: int | None = None  # mask side in mm, for masking models (None: DEFAULT_MASK_SIZE_MM)
    mask_mode: str = "sliding"  # how masking models place their masks (MASK_MODES)
    device: str = "auto"
    threshold: float | None = None
    skull_stripped: bool | None = None  # None: detected from the image (uad.input_check)
    brain_mask: str | None = None
    refine: str = "none"
    median_mm: float | None = None
    brain_erosion_mm: float | None = None
    min_component_mm3: float | None = None
    top_k: int | None = None
    dilation_mm: float | None = None
    batch_size: int = 16

    def __post_init__(self):
        if self.mask_size is not None and self.mask_size not in MASK_SIZES_MM:
            raise UserInputError(f"mask size {self.mask_size} is not supported; use one of {MASK_SIZES_MM} (mm)")
        if self.mask_mode not in MASK_MODES:
            raise UserInputError(f"mask mode {self.mask_mode!r} is not supported; use one of {MASK_MODES}")
        if self.batch_size < 1:
            raise UserInputError("batch size must be at least 1")

    @property
    def effective_mask_size(self) -> int:
        return DEFAULT_MASK_SIZE_MM if self.mask_size is None else self.mask_size


@dataclass
class DetectionResult:
    out_dir: Path
    report: dict = field(default_factory=dict)

    @property
    def warnings(self) -> list[str]:
        """Doubts about the input or the options (also in report.json); empty when there are none."""
        return list(self.report.get("warnings", []))


def resolve_checkpoint_path(model: str | None) -> Path:
    """A bundled model name or a checkpoint file -> the file to load."""
    if model and (model.endswith(".pt") or "/" in model):
        return Path(model)
    return catalog.get_model_info(model or catalog.default_model_name()).path


def _seconds_since(start: float) -> float:
    """Seconds since ``start`` (a perf_counter value), to the millisecond: a z-score's inference takes a few, and a
    stage recorded as 0.00 would read as not run."""
    return round(time.perf_counter() - start, 3)


class Detector:
    def __init__(self, options: DetectOptions):
        self.options = options
        self.device = resolve_device(options.device)
        self.checkpoint_path = resolve_checkpoint_path(options.model)  # unknown names fail here, before any I/O

    @cached_property
    def checkpoint(self) -> Checkpoint:
        """Loaded (and verified) on first use, so a bad input is reported before the model is read."""
        checkpoint = load_checkpoint(self.checkpoint_path)
        mode = self.options.mask_mode
        if mode != "sliding" and mode not in checkpoint.model.mask_modes:
            raise UserInputError(f"--mask-mode {mode} needs a model that masks its input (swin-mae, mae-classifier); "
                                 f"{checkpoint.name} does not mask")
        checkpoint.model.to(self.device)
        return checkpoint

    @cached_property
    def postprocessing(self) -> PostprocessConfig:
        """The checkpoint's calibrated settings, overridden by what the user asked for."""
        mode = self.options.mask_mode if self.options.threshold is None else "sliding"  # a given threshold wins
        calibrated = self.checkpoint.calibrated_postprocessing(self.options.effective_mask_size, mode).to_dict()
        overrides = {key: getattr(self.options, key)
                     for key in ("threshold", "median_mm", "brain_erosion_mm", "min_component_mm3", "top_k",
                                 "dilation_mm")
                     if getattr(self.options, key) is not None}
        return PostprocessConfig.from_dict({**calibrated, **overrides, "refine": self.options.refine})

    def run(self, input_path: str | Path, out_dir: str | Path, progress: Progress | None = None) -> DetectionResult:
        progress = progress or Progress("none", STAGE_WEIGHTS)
        out_dir = Path(out_dir)
        check_output_folder(out_dir)  # before any processing: an unwritable --out fails in a second, not after
        staging = _staging_dir(out_dir)
        try:
            report = self._run(Path(input_path), staging, progress)
            _publish(staging, out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        progress.done(out_dir=str(out_dir), device=self.device)
        return DetectionResult(out_dir, report)

    def _run(self, input_path: Path, staging: Path, progress: Progress) -> dict:
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        progress.update("load", 0.0, f"loading {input_path.name}")
        volume = load_volume(input_path)
        brain_mask = load_volume(self.options.brain_mask, what="brain mask") if self.options.brain_mask else None
        skull_stripping = decide_skull_stripping(volume, self.options.skull_stripped, brain_mask is not None)
        checkpoint = self.checkpoint
        option_warnings = self._option_warnings()
        seconds["load"] = _seconds_since(started)

        progress.update("preprocessing", 0.0, "bias correction and registration")
        prep = preprocess(volume, checkpoint.preprocessing, brain_mask=brain_mask,
                          skull_stripped=skull_stripping.skull_stripped)
        try:
            clock = time.perf_counter()
            input_check = check_preprocessed(volume, prep, skull_stripping)
            input_check.raise_if_refused()  # not a brain T1: nothing is written
            for warning in input_check.warnings + option_warnings:
                log.info("warning: %s", warning)  # callers get them in the result and report.json
            seconds.update(prep.seconds)
            seconds["input_check"] = _seconds_since(clock)
            progress.update("inference", 0.0, f"running {checkpoint.name} on {self.device}")
            clock = time.perf_counter()
            mask_size_px = checkpoint.preprocessing.mask_size_px(self.options.effective_mask_size)
            prediction = predict_with_mask_mode(checkpoint.model, prep.image, prep.brain_mask, mask_size_px,
                                                self.options.mask_mode, batch_size=self.options.batch_size,
                                                progress=progress.stage_callback("inference"))
            seconds["inference"] = _seconds_since(clock)

            progress.update("postprocessing", 0.0, "mapping back and segmenting")
            clock = time.perf_counter()
            brain = prep.input_brain_mask.data.astype(bool)
            scale, offset = prep.intensity_scale, prep.intensity_offset
            reconstruction = prep.to_input_space(prediction.reconstruction) * scale + offset
            reconstruction = np.where(brain, reconstruction, volume.data).astype(np.float32)
            residual = prep.to_input_space(prediction.residual) * brain
            anomaly_map = np.clip(prep.to_input_space(prediction.anomaly_map), 0, None) * brain
            spacing = tuple(float(s) for s in volume.spacing)
            filtered = median_filter(anomaly_map, brain, spacing, self.postprocessing.median_mm)
            segmentation = segment_filtered(filtered, brain, spacing, self.postprocessing, image=volume.data)
            # Slice scores where segmentation may flag: inside the eroded brain (the brain's rim is noisy).
            scoring_region = erode_brain_mask(brain, spacing, self.postprocessing.brain_erosion_mm)
            scored = filtered
            if prediction.slice_scores is not None:  # the model's own slice scores, carried onto the input's slices
                per_slice = np.broadcast_to(prediction.slice_scores, prep.image.shape)
                scored = prep.to_input_space(np.ascontiguousarray(per_slice, np.float32)) * brain
            slice_scores, volume_score = _scores(scored, brain, scoring_region, volume.affine)
            findings = find_components(segmentation, anomaly_map, volume.affine)
            seconds["postprocessing"] = _seconds_since(clock)
        finally:
            prep.close()

        progress.update("writing", 0.0, "writing outputs")
        clock = time.perf_counter()
        outputs = {
            "reconstruction": (reconstruction, np.float32),
            "residual": (residual, np.float32),
            "anomaly_map": (anomaly_map, np.float32),
            "segmentation": (segmentation, np.uint8),
            "brain_mask": (brain, np.uint8),
        }
        try:
            for name, (array, dtype) in outputs.items():
                save_volume(Volume(array, volume.affine, volume.header_codes), staging / f"{name}.nii.gz", dtype=dtype)
            _write_overview(staging / "overview.png", volume, outputs, filtered, self.postprocessing.threshold)
            write_findings_csv(staging / "findings.csv", findings)
        except OSError as exc:  # disk full, quota, a folder removed under us
            raise unwritable_error(staging.parent, exc) from exc
        seconds["writing"] = _seconds_since(clock)
        seconds["total"] = _seconds_since(started)

        report = {
            "input": str(input_path.resolve()),
            "model": checkpoint.name,
            "model_version": checkpoint.version,
            "weights_sha256": checkpoint.sha256,
            "threshold": self.postprocessing.threshold,
            "threshold_source": "--threshold" if self.options.threshold is not None else "calibrated",
            "calibration": self._calibration_report(),
            "device": self.device,
            "mask_size": self.options.effective_mask_size if checkpoint.model.uses_mask_size else None,
            "mask_mode": self.options.mask_mode if checkpoint.model.mask_modes else None,
            "input_check": input_check.to_dict(),
            "warnings": input_check.warnings + option_warnings,
            "seconds": seconds,
            "peak_memory_mb": peak_memory_mb(),
            "volume_score": volume_score,
            "slice_scores": slice_scores,
            "slice_axis": "input voxel axis closest to inferior-superior, listed inferior to superior",
            "segmented_voxels": int(segmentation.sum()),
            "segmented_volume_ml": round(float(segmentation.sum() * np.prod(volume.spacing)) / 1000, 3),
            "postprocessing": self.postprocessing.to_dict(),
            # Connected components of the segmentation, most anomalous first; voxel indices in the input's order.
            "findings": [_rounded(finding.to_dict()) for finding in findings],
            "options": asdict(self.options),
            "uad_version": uad.__version__,
            "torch_version": torch.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            raise unwritable_error(staging.parent, exc) from exc
        return report

    def _calibration_report(self) -> dict:
        """How the threshold in use was calibrated, including the mask size it was calibrated at."""
        checkpoint = self.checkpoint
        calibration = {k: v for k, v in checkpoint.calibration.items() if k != "postprocessing"}
        if checkpoint.model.uses_mask_size:
            by_size = checkpoint.calibration.get("threshold_by_mask_size_mm", {})
            asked = self.options.effective_mask_size
            calibration["mask_size_mm"] = asked if str(asked) in by_size else self._default_mask_size_mm()
        return calibration

    def _default_mask_size_mm(self) -> int | None:
        """The mask size a masking model uses when given none (its calibration ran at it)."""
        default_px = getattr(self.checkpoint.model.config, "default_mask_size_px", None)
        grid_spacing = self.checkpoint.preprocessing.working_grid.spacing
        return None if default_px is None else int(round(default_px * grid_spacing))

    def _option_warnings(self) -> list[str]:
        """Options that do not apply to this model, or a threshold calibrated for other settings."""
        warnings = []
        checkpoint = self.checkpoint
        if self.options.mask_size is not None and not checkpoint.model.uses_mask_size:
            warnings.append(f"--mask-size {self.options.mask_size} was ignored: {checkpoint.name} does not mask its "
                            f"input (only masking models such as swin-mae do)")
        if checkpoint.model.uses_mask_size and self.options.threshold is None:
            calibrated_at = self._calibration_report().get("mask_size_mm")
            if calibrated_at is not None and calibrated_at != self.options.effective_mask_size:
                warnings.append(f"{checkpoint.name}'s threshold was calibrated at {calibrated_at} mm masks, not at "
                                f"the {self.options.effective_mask_size} mm asked for; its false-positive rate "
                                f"may differ (give --threshold, or recalibrate with 'uad calibrate')")
        return warnings


def detect(input_path: str | Path, out_dir: str | Path, options: DetectOptions | None = None,
           progress_mode: str = "none") -> DetectionResult:
    """Run one detection with a freshly loaded model (see :class:`Detector` to reuse one)."""
    progress = Progress(progress_mode, STAGE_WEIGHTS)
    try:
        return Detector(options or DetectOptions()).run(input_path, out_dir, progress)
    finally:
        progress.close()


def _staging_dir(out_dir: Path) -> Path:
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=parent))
    except OSError as exc:
        raise unwritable_error(out_dir, exc) from exc


def _publish(staging: Path, out_dir: Path) -> None:
    try:
        out_dir.mkdir(exist_ok=True)
        for name in OUTPUT_FILES:
            (staging / name).replace(out_dir / name)
    except OSError as exc:
        raise unwritable_error(out_dir, exc) from exc


def peak_memory_mb() -> float | None:
    """This process's peak resident memory; None where the OS does not say (Windows has no ``resource``)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)  # bytes on macOS, KiB on Linux


def _rounded(values: dict) -> dict:
    """Six decimals for floats (sub-micrometre in mm, far below any score's noise), kept as numbers."""

    def one(value):
        if isinstance(value, float):
            return round(value, 6)
        if isinstance(value, (tuple, list)):
            return [one(v) for v in value]
        return value

    return {key: one(value) for key, value in values.items()}


def write_findings_csv(path: Path, findings: list[Finding]) -> None:
    """One row per finding (rank 1 = most anomalous); vectors spread over columns (``centroid_ras_r``...)."""
    suffixes = {"centroid_ras": ("r", "a", "s"), "centroid_voxel": ("i", "j", "k"),
                "bbox_voxel": ("i_min", "j_min", "k_min", "i_max", "j_max", "k_max")}
    header = ["rank"] + [f"{c}_{s}" if c in suffixes else c for c in FINDING_COLUMNS for s in suffixes.get(c, ("",))]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for rank, finding in enumerate(findings, start=1):
            row = [rank]
            for value in _rounded(finding.to_dict()).values():
                row.extend(value if isinstance(value, list) else [value])
            writer.writerow(row)


def superior_axis(affine: np.ndarray) -> tuple[int, bool]:
    """(voxel axis closest to inferior->superior, whether its index runs superior->inferior)."""
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    axis = int(np.argmax(np.abs(directions[2])))
    return axis, bool(directions[2, axis] < 0)


def _scores(filtered: np.ndarray, brain: np.ndarray, region: np.ndarray,
            affine: np.ndarray) -> tuple[list[float | None], float]:
    """Slice score = 99th percentile of the filtered map in the slice's ``region`` (0 if the slice has brain but
    none of the region, None without brain); volume score = the maximum."""
    axis, reversed_order = superior_axis(affine)
    maps, brains, regions = (np.moveaxis(a, axis, 0) for a in (filtered, brain, region))
    scores = [None if not b.any() else float(np.percentile(m[r], 99)) if r.any() else 0.0
              for m, b, r in zip(maps, brains, regions)]
    if reversed_order:
        scores = scores[::-1]
    present = [s for s in scores if s is not None]
    return [None if s is None else round(s, 6) for s in scores], round(max(present), 6) if present else 0.0


def _write_overview(path: Path, volume: Volume, outputs: dict, filtered: np.ndarray, threshold: float) -> None:
    """overview.png in canonical (RAS) orientation; the map shown is the filtered one the threshold applies to."""

    def canonical(array: np.ndarray) -> np.ndarray:
        return np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(array, volume.affine)).dataobj)

    # The affine nibabel gives the canonical arrays above (for the rows' positions in mm).
    to_canonical = nib.orientations.io_orientation(volume.affine)
    canonical_affine = volume.affine @ nib.orientations.inv_ornt_aff(to_canonical, volume.data.shape[:3])

    save_overview(
        path,
        image=canonical(volume.data),
        reconstruction=canonical(outputs["reconstruction"][0]),
        anomaly_map=canonical(filtered),
        segmentation=canonical(outputs["segmentation"][0].astype(np.uint8)),
        brain_mask=canonical(outputs["brain_mask"][0].astype(np.uint8)),
        threshold=threshold,
        affine=canonical_affine,
    )
