"""VQ-VAE (van den Oord et al. 2017; MONAI's network, as Malé et al. used) on axial slices.

The bottleneck is what makes it a pseudo-healthy model: a 4x model copies anomalies through (EVALUATION.md).
Here 16x downsampling (5 x 6 codes for an 80 x 96 slice) beat 8x on the validation subjects' synthetic-anomaly
AUPRC with the same training budget, so it is the default; the bundled model's card gives its figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from monai.networks.nets import VQVAE

from uad.models.base import LossOutput
from uad.models.registry import register
from uad.models.slicewise import SliceConfig, SliceModel


@dataclass(frozen=True)
class VQVAEConfig(SliceConfig):
    name: ClassVar[str] = "vqvae"
    # One stride-2 level per entry: 16x downsampling; ~0.2 s per batch of 32 on a 2-core CPU.
    channels: tuple[int, ...] = (16, 32, 64, 64)
    num_res_layers: int = 1
    num_embeddings: int = 256
    embedding_dim: int = 32
    commitment_cost: float = 0.25


@register(VQVAEConfig)
class VQVAEModel(SliceModel):
    family = "reconstruction"
    description = "VQ-VAE (Malé et al.): reconstructs each axial slice through a small discrete code (16x smaller)."

    def __init__(self, config: VQVAEConfig):
        super().__init__(config)
        levels = len(config.channels)
        self.network = VQVAE(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=config.channels,
            num_res_layers=config.num_res_layers,
            num_res_channels=config.channels,
            downsample_parameters=((2, 4, 1, 1),) * levels,
            upsample_parameters=((2, 4, 1, 1, 0),) * levels,
            num_embeddings=config.num_embeddings,
            embedding_dim=config.embedding_dim,
            commitment_cost=config.commitment_cost,
        )

    def reconstruct(self, images, masks, mask_size_px=None) -> torch.Tensor:
        reconstruction, _ = self.network(images)
        return reconstruction * masks

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> LossOutput:
        reconstruction, quantization_loss = self.network(images)
        l1 = F.l1_loss(reconstruction * masks, images)
        total = l1 + quantization_loss
        return LossOutput(total, {"l1": l1.item(), "quantization": quantization_loss.item()})
