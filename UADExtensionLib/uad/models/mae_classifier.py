"""MAE + pseudo-abnormal module + ViT classifier (Georgescu 2023): a slice-level anomaly score.

Stage 1 is the bundled ``swin-mae`` (``--init-from`` copies and freezes it). Georgescu's MAE averages 4 randomly
masked reconstructions with the unmasked tokens replaced by the originals; the sliding-mask composite of
``swin-mae`` (64 mm masks) is the deterministic version of that (4 passes, every pixel from the pass that masked
it). The classifier learned the differences of that one mask size, so this model has no mask-size choice.

Stage 2, trained here: the pseudo-abnormal module multiplies 1-10 random boxes of the reconstruction by
beta ~ U(0, 1), so |x - x_hat| gets bright, lesion-like blobs; a small ViT learns to tell the difference
maps of such pseudo-abnormal reconstructions from normal ones. Its probability is the slice score; the
pixel map is the residual (as in the paper), normalised like every slice model's. The trainer's validation score
(pixel AUPRC) cannot see the classifier, so stage 2 trains a fixed number of steps, validated once at the end.
ViT: 8 px patches (120 tokens), 4 layers, width 64: 0.15 M parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from uad.models.base import LossOutput
from uad.models.registry import register
from uad.models.swin_mae import SwinMAEConfig, SwinMAEModel


@dataclass(frozen=True)
class MAEClassifierConfig(SwinMAEConfig):
    name: ClassVar[str] = "mae-classifier"
    classifier_patch: int = 8
    classifier_width: int = 64
    classifier_layers: int = 4
    classifier_heads: int = 4
    max_boxes: int = 10
    box_side_px: tuple[int, int] = (4, 24)  # 8-48 mm on the 2 mm grid


class DifferenceViT(nn.Module):
    """ViT over a (B, 1, H, W) difference map -> (B,) logit of "abnormal"."""

    def __init__(self, grid_shape: tuple[int, int], config: MAEClassifierConfig):
        super().__init__()
        p, width = config.classifier_patch, config.classifier_width
        self.embed = nn.Conv2d(1, width, p, stride=p)
        tokens = (grid_shape[0] // p) * (grid_shape[1] // p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, config.classifier_heads, 2 * width, dropout=0.1, batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, config.classifier_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 1))

    def forward(self, difference: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(difference).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.position
        return self.head(self.layers(tokens)[:, 0])[:, 0]


@register(MAEClassifierConfig)
class MAEClassifierModel(SwinMAEModel):
    family = "masking"
    uses_mask_size = False  # the classifier learned the differences of one mask size: its default (64 mm)
    keeps_stage_one_map = True  # --init-from also copies stage 1's healthy map statistics
    description = "MAE + anomaly classifier (Georgescu): a ViT scores each slice's residual; the map is the residual."

    config: MAEClassifierConfig

    def __init__(self, config: MAEClassifierConfig):
        super().__init__(config)
        self.classifier = DifferenceViT(config.grid_shape[:2], config)
        self.network.requires_grad_(False)  # stage 1 is the trained ``swin-mae``

    def pseudo_abnormal(self, reconstructions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Multiply 1..max_boxes random boxes, centred in the brain, of each reconstruction by beta ~ U(0, 1)."""
        factor = torch.ones_like(reconstructions)
        low, high = self.config.box_side_px
        for item in range(len(reconstructions)):
            brain = masks[item, 0].nonzero()
            for _ in range(int(torch.randint(1, self.config.max_boxes + 1, ()))):
                h, w = (int(torch.randint(low, high + 1, ())) for _ in range(2))
                row, col = (int(v) for v in brain[int(torch.randint(len(brain), ()))])
                top, left = max(row - h // 2, 0), max(col - w // 2, 0)
                factor[item, :, top:top + h, left:left + w] *= torch.rand(())
        return reconstructions * factor

    def fit_map_statistics(self, volumes, masks, progress=None) -> None:
        # The pixel map is stage 1's, unchanged: its healthy statistics (copied by --init-from) still hold.
        if not self.map_statistics_fitted:
            super().fit_map_statistics(volumes, masks, progress)
        elif progress:
            progress(1.0)

    def reconstruct(self, images, masks, mask_size_px=None) -> torch.Tensor:
        return super().reconstruct(images, masks, self.config.default_mask_size_px)

    def score_slices(self, images, reconstructions, masks) -> torch.Tensor:
        return torch.sigmoid(self.classifier((images - reconstructions).abs() * masks))

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> LossOutput:
        with torch.no_grad():
            reconstructions = self.reconstruct(images, masks)
            abnormal = torch.rand(len(images), device=images.device) < 0.5
            pseudo = self.pseudo_abnormal(reconstructions, masks) * masks
            reconstructions = torch.where(abnormal[:, None, None, None], pseudo, reconstructions)
        logits = self.classifier((images - reconstructions).abs() * masks)
        bce = F.binary_cross_entropy_with_logits(logits, abnormal.float())
        accuracy = ((logits > 0) == abnormal).float().mean()
        return LossOutput(bce, {"bce": bce.item(), "accuracy": accuracy.item()})
