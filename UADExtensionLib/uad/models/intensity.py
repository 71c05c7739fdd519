"""The baseline every model must beat: voxel deviation from the average healthy brain in template space.

"Training" is closed form: the voxel-wise mean and standard deviation of the normalised, registered healthy
training volumes. The reconstruction is the mean brain; the anomaly map is the absolute z-score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from uad.models.base import AnomalyModel, ModelConfig, Prediction
from uad.models.registry import register


@dataclass(frozen=True)
class IntensityConfig(ModelConfig):
    name: ClassVar[str] = "intensity"
    grid_shape: tuple[int, int, int] = (80, 96, 80)
    min_std: float = 0.05  # floor on the healthy spread, so voxels that are always near-identical don't explode


@register(IntensityConfig)
class IntensityModel(AnomalyModel):
    trainable = False
    family = "baseline"
    description = "Baseline: absolute z-score of each voxel against the mean healthy brain (no network)."

    def __init__(self, config: IntensityConfig):
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.zeros(config.grid_shape))
        self.register_buffer("std", torch.ones(config.grid_shape))

    def fit(self, volumes: np.ndarray, masks: np.ndarray) -> None:
        weights = masks.astype(np.float64)
        count = np.maximum(weights.sum(axis=0), 1.0)
        mean = (volumes * weights).sum(axis=0) / count
        var = (((volumes - mean) ** 2) * weights).sum(axis=0) / count
        self.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        self.std.copy_(torch.from_numpy(np.sqrt(var).astype(np.float32)))

    @torch.inference_mode()
    def predict(self, image, brain_mask, mask_size_px=None, batch_size=16, progress=None) -> Prediction:
        mean = self.mean.cpu().numpy()
        std = np.maximum(self.std.cpu().numpy(), self.config.min_std)
        residual = np.abs(image - mean) * brain_mask
        if progress:
            progress(1.0)
        return Prediction(
            reconstruction=(mean * brain_mask).astype(np.float32),
            residual=residual.astype(np.float32),
            anomaly_map=(residual / std).astype(np.float32),
        )
