"""Reverse autoencoder (RAE; Bercea et al., MIDL 2023, as evaluated by Malé et al.: MSE + KL + embedding loss).

A variational autoencoder whose whole slice passes through a 128-number latent: too small to copy a lesion, so
the decoder paints the healthy brain it has learned. The embedding loss re-encodes the reconstruction and asks
its features, at every encoder level, to match those of the input: the reconstruction must be *the same brain*
to the encoder, not just close in pixels, which is what keeps a VAE's blur from erasing anatomy. At inference
the latent mean is decoded (no sampling), so the output is deterministic. 2.0 M parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from uad.models.base import LossOutput
from uad.models.registry import register
from uad.models.slicewise import SliceConfig, SliceModel


@dataclass(frozen=True)
class RAEConfig(SliceConfig):
    name: ClassVar[str] = "rae"
    channels: tuple[int, ...] = (16, 32, 64, 128)  # one stride-2 level each: 80 x 96 -> 5 x 6
    latent_dim: int = 128
    kl_weight: float = 1e-4  # on the per-slice KL sum; the MSE is a per-pixel mean
    embedding_weight: float = 0.1


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4 if stride == 2 else 3, stride, 1), nn.GroupNorm(8, c_out),
                         nn.LeakyReLU(0.2))


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.GroupNorm(8, c_out), nn.LeakyReLU(0.2))


class Encoder(nn.Module):
    def __init__(self, channels: tuple[int, ...], latent_dim: int, bottom: tuple[int, int]):
        super().__init__()
        levels, c_in = [], 1
        for c in channels:
            levels.append(nn.Sequential(_conv(c_in, c, 2), _conv(c, c, 1)))
            c_in = c
        self.levels = nn.ModuleList(levels)
        self.to_latent = nn.Linear(channels[-1] * bottom[0] * bottom[1], 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        mu, log_var = self.to_latent(x.flatten(1)).chunk(2, dim=1)
        return mu, log_var.clamp(-10, 10), features


@register(RAEConfig)
class RAEModel(SliceModel):
    family = "reconstruction"
    description = "Reverse autoencoder (Bercea et al.): a VAE held to the input by an encoder-embedding loss."

    config: RAEConfig
    reads_any_slice_shape = False  # its dense bottleneck holds one axial slice's shape

    def __init__(self, config: RAEConfig):
        super().__init__(config)
        factor = 2 ** len(config.channels)
        self.bottom = (config.grid_shape[0] // factor, config.grid_shape[1] // factor)
        self.encoder = Encoder(config.channels, config.latent_dim, self.bottom)
        self.from_latent = nn.Linear(config.latent_dim, config.channels[-1] * self.bottom[0] * self.bottom[1])
        ups = [_up(c_in, c_out) for c_in, c_out in zip(config.channels[::-1], config.channels[-2::-1])]
        self.decoder = nn.Sequential(*ups, nn.ConvTranspose2d(config.channels[0], config.channels[0], 4, 2, 1),
                                     nn.LeakyReLU(0.2), nn.Conv2d(config.channels[0], 1, 3, 1, 1))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.from_latent(latent).view(len(latent), self.config.channels[-1], *self.bottom)
        return self.decoder(x)

    def reconstruct(self, images, masks, mask_size_px=None) -> torch.Tensor:
        mu, _, _ = self.encoder(images)
        return self.decode(mu).clamp(0, None) * masks

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> LossOutput:
        mu, log_var, features = self.encoder(images)
        latent = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        reconstruction = self.decode(latent) * masks
        mse = F.mse_loss(reconstruction, images)
        kl = (-0.5 * (1 + log_var - mu**2 - log_var.exp()).sum(dim=1)).mean()
        _, _, recon_features = self.encoder(reconstruction)
        embedding = sum(F.mse_loss(r, f.detach()) for r, f in zip(recon_features, features)) / len(features)
        total = mse + self.config.kl_weight * kl + self.config.embedding_weight * embedding
        return LossOutput(total, {"mse": mse.item(), "kl": kl.item(), "embedding": embedding.item()})
