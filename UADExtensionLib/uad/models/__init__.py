"""The model registry; importing this package registers every model."""

from uad.models import (  # noqa: F401  (registration side effect)
    dae,
    fusion,
    intensity,
    mae_classifier,
    patch_retrieval,
    rae,
    swin_mae,
    vqvae,
    vqvae_transformer,
)
from uad.models.base import AnomalyModel, LossOutput, ModelConfig, Prediction
from uad.models.registry import build_model, get_spec, list_models

__all__ = ["AnomalyModel", "LossOutput", "ModelConfig", "Prediction", "build_model", "get_spec", "list_models"]
