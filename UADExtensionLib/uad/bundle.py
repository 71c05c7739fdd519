"""Keeping a folder's ``manifest.json`` (the SHA-256 list that loading verifies against) in step with its files."""

from __future__ import annotations

from pathlib import Path

from uad import catalog
from uad.catalog import ModelInfo
from uad.checkpoint import Checkpoint, file_sha256


def manifest_entry(checkpoint: Checkpoint, file: str, sha256: str) -> ModelInfo:
    model = checkpoint.model
    return ModelInfo(
        name=checkpoint.name,
        file=file,
        sha256=sha256,
        family=model.family,
        description=model.description,
        uses_mask_size=model.uses_mask_size,
        parameters=sum(p.numel() for p in model.parameters()),
        threshold=float(checkpoint.threshold or 0.0),
        version=checkpoint.version,
        working_grid=checkpoint.preprocessing.to_dict()["working_grid"],
        expected_seconds_cpu=checkpoint.training.get("expected_seconds_cpu"),
    )


def add_to_manifest(path: Path, checkpoint: Checkpoint, default: str | None = None) -> ModelInfo:
    """(Re)list the checkpoint file ``path`` in ``path.parent/manifest.json`` with its current SHA-256."""
    manifest = path.parent / "manifest.json"
    entry = manifest_entry(checkpoint, path.name, file_sha256(path))
    others = [m for m in catalog.list_models(manifest) if m.file != path.name and m.name != entry.name]
    default = default or catalog.load_manifest(manifest).get("default") or entry.name
    catalog.write_manifest([*others, entry], default=default, path=manifest)
    return entry
