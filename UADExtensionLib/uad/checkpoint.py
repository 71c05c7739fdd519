"""Checkpoints that reproduce a result from the file alone, loaded safely and verified.

A checkpoint is a plain dict (``torch.load(weights_only=True)`` can read it, so a file cannot run code):
model name + config, state dict, preprocessing config, calibration (threshold and how it was set) and
training provenance (data, subjects, command, seed, dates, versions). Every file is checked against the
SHA-256 in the ``manifest.json`` beside it before it is loaded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uad import catalog
from uad.errors import UserInputError
from uad.models import AnomalyModel, build_model, get_spec
from uad.postprocessing import PostprocessConfig
from uad.preprocessing import PreprocessConfig

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    model: AnomalyModel
    preprocessing: PreprocessConfig
    calibration: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    version: str = "1"
    sha256: str = ""

    @property
    def name(self) -> str:
        return self.model.config.name

    @property
    def threshold(self) -> float | None:
        return self.calibration.get("threshold")

    def calibrated_postprocessing(self, mask_size_mm: int | None = None,
                                  mask_mode: str = "sliding") -> PostprocessConfig:
        """The post-processing calibrated on healthy data; masking models have a threshold per mask size, and per
        mask mode other than the default ``sliding`` (under ``threshold_by_mask_mode``, in the same layout).

        Raises :class:`UserInputError` when the checkpoint was never calibrated for ``mask_mode``.
        """
        settings = dict(self.calibration.get("postprocessing") or {"threshold": 0.0})
        calibrated = self.calibration
        if mask_mode != "sliding":
            calibrated = self.calibration.get("threshold_by_mask_mode", {}).get(mask_mode)
            if calibrated is None:
                raise UserInputError(f"{self.name} has no threshold calibrated for --mask-mode {mask_mode}; run "
                                     f"'uad calibrate --model CHECKPOINT --data HEALTHY_DIR', or give --threshold")
            settings["threshold"] = calibrated["threshold"]
        by_mask_size = calibrated.get("threshold_by_mask_size_mm", {})
        if self.model.uses_mask_size and str(mask_size_mm) in by_mask_size:
            settings["threshold"] = by_mask_size[str(mask_size_mm)]
        return PostprocessConfig.from_dict(settings)

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "model": {"name": self.name, "version": self.version, "config": self.model.config.to_dict()},
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "preprocessing": self.preprocessing.to_dict(),
            "calibration": self.calibration,
            "training": self.training,
        }


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike) -> str:
    """Write atomically (a crash never leaves a half-written file under the final name); returns SHA-256."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint.to_dict(), tmp)
    os.replace(tmp, path)
    return file_sha256(path)


def load_checkpoint(path: str | os.PathLike, expected_sha256: str | None = None) -> Checkpoint:
    """Load and rebuild a checkpoint; ``expected_sha256`` defaults to the manifest beside the file."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"checkpoint not found: {path}; check the path or run 'uad models'")
    if expected_sha256 is None:
        entry = next((m for m in catalog.list_models(path.parent / "manifest.json") if m.file == path.name), None)
        if entry is None:
            raise UserInputError(
                f"checkpoint {path.name} is not listed in {path.parent / 'manifest.json'}; "
                "keep the manifest.json that 'uad train' wrote beside it (it holds the SHA-256 every load verifies)"
            )
        expected_sha256 = entry.sha256
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise UserInputError(
            f"checkpoint {path.name} fails its SHA-256 check (file {actual[:12]}..., manifest "
            f"{expected_sha256[:12]}...); the file is corrupt or was replaced: reinstall or retrain it"
        )
    return checkpoint_from_dict(torch.load(path, map_location="cpu", weights_only=True), actual)


def checkpoint_from_dict(data: dict, sha256: str = "") -> Checkpoint:
    if data.get("format_version") != FORMAT_VERSION:
        raise UserInputError(f"checkpoint format {data.get('format_version')} is not supported by this uad version")
    spec = get_spec(data["model"]["name"])
    model = build_model(spec.config_cls.from_checkpoint(data["model"]["config"]))
    model.load_state_dict(data["state_dict"])
    model.eval()
    return Checkpoint(
        model=model,
        preprocessing=PreprocessConfig.from_dict(data["preprocessing"]),
        calibration=data.get("calibration", {}),
        training=data.get("training", {}),
        version=str(data["model"].get("version", "1")),
        sha256=sha256,
    )
