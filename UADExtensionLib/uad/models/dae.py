"""Denoising autoencoder with coarse noise (Kascenas, Pugeault & O'Neil, MIDL 2022).

A U-Net learns to remove Gaussian noise that is drawn on a coarse grid (here 1/8 of the slice, 10 x 12 for an
80 x 96 slice: blobs of ~16 mm) and upsampled, so the noise looks like a smooth, lesion-sized intensity change
rather than pixel speckle. To undo it the network must know what healthy tissue looks like at that scale, and at
inference it "denoises" a lesion the same way: into healthy tissue. The skip connections carry every detail the
noise did not touch, so healthy anatomy comes back sharp (unlike a bottleneck autoencoder) and the residual is
small everywhere except where the input does not look healthy.

The paper's settings at 128 px: noise resolution 16 (1/8), std 0.2, L2 loss on the brain; the noise is added
inside the brain only. Kascenas et al. train for hundreds of epochs; EVALUATION.md found on this data that the
validation AUPRC peaks early (longer training teaches it to copy), so the training loop's checkpoint choice by
validation AUPRC matters more here than for the other models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet

from uad.models.base import LossOutput
from uad.models.registry import register
from uad.models.slicewise import SliceConfig, SliceModel


@dataclass(frozen=True)
class DAEConfig(SliceConfig):
    name: ClassVar[str] = "dae"
    channels: tuple[int, ...] = (32, 64, 128, 256)  # one stride-2 level between entries: 80 x 96 -> 10 x 12
    num_res_units: int = 1
    noise_grid_divisor: int = 8  # noise drawn on an (H / 8) x (W / 8) grid, then upsampled (the paper's 16 of 128)
    noise_std: float = 0.2  # in normalised units (brain 99th percentile = 1), as in the paper


def coarse_noise(shape: tuple[int, ...], divisor: int, std: float, generator_device: torch.device) -> torch.Tensor:
    """(B, 1, H, W) Gaussian noise drawn on a grid ``divisor`` times coarser and upsampled bilinearly."""
    batch, channels, height, width = shape
    coarse = torch.randn(batch, channels, max(1, height // divisor), max(1, width // divisor),
                         device=generator_device) * std
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


@register(DAEConfig)
class DAEModel(SliceModel):
    family = "reconstruction"
    description = ("Denoising U-Net (Kascenas et al.): trained to remove coarse, lesion-sized noise; returns healthy "
                   "tissue sharp and replaces what does not look healthy.")

    config: DAEConfig

    def __init__(self, config: DAEConfig):
        super().__init__(config)
        self.network = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=config.channels,
                            strides=(2,) * (len(config.channels) - 1), num_res_units=config.num_res_units)

    def reconstruct(self, images, masks, mask_size_px=None) -> torch.Tensor:
        return self.network(images).clamp(0, None) * masks

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> LossOutput:
        noise = coarse_noise(images.shape, self.config.noise_grid_divisor, self.config.noise_std, images.device)
        denoised = self.network(images + noise * masks)
        # Mean squared error over brain pixels only: the background is trivially 0 and would dilute the loss.
        mse = ((denoised - images) ** 2 * masks).sum() / masks.sum().clamp(min=1)
        return LossOutput(mse, {"mse": mse.item()})
