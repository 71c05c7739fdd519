"""The model registry; importing this package registers every model."""

from uad.models import intensity, mae_classifier, rae, swin_mae, vqvae, vqvae_transformer  # noqa: F401  (registration side effect)
from uad.models.base import AnomalyModel, LossOutput, ModelConfig, Prediction
from uad.models.registry import build_model, get_spec, list_models

__all__ = ["AnomalyModel", "LossOutput", "ModelConfig", "Prediction", "build_model", "get_spec", "list_models"]
