"""The bundled models as listed in ``resources/weights/manifest.json``; imports neither torch nor ants.

The manifest is what the Slicer panel reads before any heavy package is installed, and the SHA-256 list that
:func:`uad.checkpoint.load_checkpoint` verifies every bundled file against. It is written by
:mod:`uad.bundle` from the checkpoints themselves, so it never disagrees with them.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from uad.errors import UserInputError
from uad.resources import WEIGHTS_DIR

MANIFEST = WEIGHTS_DIR / "manifest.json"


@dataclass(frozen=True)
class ModelInfo:
    """One bundled model, as shown by ``uad models`` and the Slicer model selector."""

    name: str
    file: str
    sha256: str
    family: str
    description: str
    modality: str = "T1"
    uses_mask_size: bool = False
    parameters: int = 0
    threshold: float = 0.0
    version: str = "1"
    working_grid: dict = field(default_factory=dict)
    expected_seconds_cpu: float | None = None

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.file

    def to_dict(self) -> dict:
        return asdict(self)


def load_manifest(path: Path = MANIFEST) -> dict:
    if not path.exists():
        return {"default": None, "models": []}
    return json.loads(path.read_text())


def list_models(path: Path = MANIFEST) -> list[ModelInfo]:
    return [ModelInfo(**entry) for entry in load_manifest(path)["models"]]


def default_model_name(path: Path = MANIFEST) -> str:
    manifest = load_manifest(path)
    if not manifest["models"]:
        raise UserInputError("no bundled models are installed; reinstall the package or train one with 'uad train'")
    return manifest.get("default") or manifest["models"][0]["name"]


def get_model_info(name: str, path: Path = MANIFEST) -> ModelInfo:
    models = {m.name: m for m in list_models(path)}
    if name not in models:
        hint = difflib.get_close_matches(name, list(models), n=1)
        suggestion = f"did you mean '{hint[0]}'? " if hint else ""
        raise UserInputError(f"unknown model '{name}'; {suggestion}choose one of: {', '.join(sorted(models))}")
    return models[name]


def write_manifest(models: list[ModelInfo], default: str, path: Path = MANIFEST) -> None:
    entries = sorted((m.to_dict() for m in models), key=lambda m: m["name"])
    path.write_text(json.dumps({"default": default, "models": entries}, indent=2) + "\n")
