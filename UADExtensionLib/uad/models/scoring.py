"""Turning (image, reconstruction) into an anomaly map: residual plus a structural (1 - SSIM) term.

Malé et al. combine the L1 residual with a perceptual difference. A pretrained perceptual network would need
a download, so the structural term is a local SSIM map (Gaussian window), which needs no weights and catches
what an intensity residual misses: regions whose texture differs while their mean intensity looks normal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    return (kernel[:, None] * kernel[None, :])[None, None]


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 7,
             sigma: float = 1.5) -> torch.Tensor:
    """Local SSIM of two (B, 1, H, W) batches, same shape out (reflect-padded, so no border shrink)."""
    kernel = _gaussian_window(window, sigma, x.device)
    pad = window // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode="reflect"), kernel)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def combined_anomaly_map(images: torch.Tensor, reconstructions: torch.Tensor, masks: torch.Tensor,
                         ssim_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual, anomaly map) for (B, 1, H, W) batches; both 0 outside the brain mask."""
    residual = (images - reconstructions).abs() * masks
    if ssim_weight <= 0:
        return residual, residual
    structural = (1 - ssim_map(images, reconstructions)).clamp(min=0) * masks
    return residual, residual + ssim_weight * structural
