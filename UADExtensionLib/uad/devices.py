"""Which torch device runs the model: asked for explicitly, reported honestly, never silently swapped."""

from __future__ import annotations

import torch

from uad.errors import UserInputError
from uad.options import DEVICE_CHOICES


def resolve_device(requested: str) -> str:
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'; an explicit 'cuda' without a GPU is an error."""
    if requested not in DEVICE_CHOICES:
        raise UserInputError(f"unknown device '{requested}'; choose one of: {', '.join(DEVICE_CHOICES)}")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda was asked for but no CUDA GPU is usable here; use --device cpu or auto")
    return requested
