"""Name -> (config class, model class). Filled by the explicit imports in ``uad.models``."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from uad.errors import UserInputError
from uad.models.base import AnomalyModel, ModelConfig


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type[ModelConfig]
    model_cls: type[AnomalyModel]


_MODELS: dict[str, ModelSpec] = {}


def register(config_cls: type[ModelConfig]):
    """Class decorator: ``@register(VQVAEConfig) class VQVAEModel(AnomalyModel)``."""

    def wrap(model_cls: type[AnomalyModel]) -> type[AnomalyModel]:
        if config_cls.name in _MODELS:
            raise ValueError(f"model {config_cls.name!r} registered twice")
        _MODELS[config_cls.name] = ModelSpec(config_cls.name, config_cls, model_cls)
        return model_cls

    return wrap


def get_spec(name: str) -> ModelSpec:
    if name not in _MODELS:
        hint = difflib.get_close_matches(name, list(_MODELS), n=1)
        suggestion = f"did you mean '{hint[0]}'? " if hint else ""
        raise UserInputError(f"unknown model '{name}'; {suggestion}choose one of: {', '.join(list_models())}")
    return _MODELS[name]


def list_models() -> list[str]:
    return sorted(_MODELS)


def build_model(config: ModelConfig) -> AnomalyModel:
    return get_spec(config.name).model_cls(config)
