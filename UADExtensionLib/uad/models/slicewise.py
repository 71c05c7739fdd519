"""Shared inference for 2D models: axial slices of the working grid, batched, brain slices only."""

from __future__ import annotations

import numpy as np
import torch

from uad.models.base import AnomalyModel, Prediction
from uad.models.scoring import combined_anomaly_map

MIN_BRAIN_FRACTION = 0.01  # slices with less brain than this are left at 0 (nothing to reconstruct)


def to_slices(volume: np.ndarray) -> np.ndarray:
    """(X, Y, Z) -> (Z, 1, X, Y): one axial slice per batch item."""
    return np.ascontiguousarray(np.moveaxis(volume, 2, 0)[:, None])


def from_slices(slices: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(slices[:, 0], 0, 2))


class SliceModel(AnomalyModel):
    """A model that reconstructs one (1, X, Y) slice at a time; subclasses implement ``reconstruct``."""

    ssim_weight: float = 0.5

    def reconstruct(self, images: torch.Tensor, masks: torch.Tensor, mask_size_px: int | None) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def predict(self, image, brain_mask, mask_size_px=None, batch_size=16, progress=None) -> Prediction:
        device = next(self.parameters()).device
        images, masks = to_slices(image.astype(np.float32)), to_slices(brain_mask.astype(np.float32))
        keep = np.flatnonzero(masks.mean(axis=(1, 2, 3)) >= MIN_BRAIN_FRACTION)
        outputs = {key: np.zeros_like(images) for key in ("reconstruction", "residual", "anomaly_map")}
        for start in range(0, len(keep), batch_size):
            index = keep[start:start + batch_size]
            x = torch.from_numpy(images[index]).to(device)
            m = torch.from_numpy(masks[index]).to(device)
            reconstruction = self.reconstruct(x, m, mask_size_px)
            residual, anomaly = combined_anomaly_map(x, reconstruction, m, self.config.ssim_weight)
            outputs["reconstruction"][index] = reconstruction.float().cpu().numpy()
            outputs["residual"][index] = residual.float().cpu().numpy()
            outputs["anomaly_map"][index] = anomaly.float().cpu().numpy()
            if progress:
                progress(min(start + batch_size, len(keep)) / max(len(keep), 1))
        return Prediction(**{key: from_slices(value) for key, value in outputs.items()})
