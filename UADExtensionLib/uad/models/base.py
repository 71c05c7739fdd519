"""What every anomaly model is: a torch module with a config, a training loss and a volume-level predict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Base of every model's config; subclasses add fields with defaults and set ``name``."""

    name: ClassVar[str] = ""
    # Options a checkpoint saved before they existed was made without, where today's default differs.
    predating_defaults: ClassVar[dict] = {}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})

    @classmethod
    def from_checkpoint(cls, values: dict) -> ModelConfig:
        """The config a saved checkpoint was made with (``from_dict`` is for new options: today's defaults)."""
        return cls.from_dict({**cls.predating_defaults, **values})


@dataclass
class Prediction:
    """A model's answer for one volume on the working grid; every array is (X, Y, Z) float32."""

    reconstruction: np.ndarray
    residual: np.ndarray
    anomaly_map: np.ndarray
    slice_scores: np.ndarray | None = None  # per axial slice, when the model scores slices itself


@dataclass
class LossOutput:
    total: torch.Tensor
    terms: dict[str, float]


class AnomalyModel(nn.Module):
    """A model trained on healthy slices only.

    ``loss`` is all the trainer needs; ``predict`` is all inference needs. Models whose "training" is a
    closed-form statistic (the intensity baseline) set ``trainable = False`` and implement ``fit``.
    """

    config: ModelConfig
    trainable: ClassVar[bool] = True
    uses_mask_size: ClassVar[bool] = False
    mask_modes: ClassVar[tuple[str, ...]] = ()  # masking models: the mask placements ``predict(mask_mode=)`` takes
    keeps_stage_one_map: ClassVar[bool] = False  # two-stage models whose anomaly map is their first stage's
    family: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # What training picks its checkpoint by (a key of uad.calibration.VALIDATION_SCORES): the pixel map's AUPRC,
    # or the slice classifier's slice AUROC where the map is a frozen first stage's.
    selection_score: ClassVar[str] = "auprc"

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> LossOutput:
        raise NotImplementedError

    def fit(self, volumes: np.ndarray, masks: np.ndarray) -> None:
        """Closed-form fit on (N, X, Y, Z) healthy volumes; only for ``trainable = False`` models."""
        raise NotImplementedError

    def fit_map_statistics(self, volumes: np.ndarray, masks: np.ndarray, progress=None) -> None:
        """After training: learn how the anomaly map varies over healthy (N, X, Y, Z) volumes. Optional."""

    @torch.inference_mode()
    def predict(self, image: np.ndarray, brain_mask: np.ndarray, mask_size_px: int | None = None,
                batch_size: int = 16, progress=None) -> Prediction:
        raise NotImplementedError


def predict_with_mask_mode(model: AnomalyModel, image: np.ndarray, brain_mask: np.ndarray,
                           mask_size_px: int | None = None, mask_mode: str = "sliding", **kwargs) -> Prediction:
    """``model.predict``, telling masking models how to place their masks (the others take no ``mask_mode``)."""
    if mask_mode == "sliding" or not model.mask_modes:
        return model.predict(image, brain_mask, mask_size_px=mask_size_px, **kwargs)
    return model.predict(image, brain_mask, mask_size_px=mask_size_px, mask_mode=mask_mode, **kwargs)
