"""MAE + pseudo-abnormal module + ViT classifier (Georgescu 2023): a slice-level anomaly score.

Stage 1 is the bundled ``swin-mae`` (``--init-from`` copies and freezes it). Georgescu's MAE averages 4 randomly
masked reconstructions with the unmasked tokens replaced by the originals; the sliding-mask composite of
``swin-mae`` (64 mm masks) is the deterministic version of that (4 passes, every pixel from the pass that masked
it). The classifier learned the differences of that one mask size, so this model has no mask-size choice.

Stage 2, trained here: the pseudo-abnormal module multiplies 1-10 random boxes of the reconstruction by
beta ~ U(0, 1), so |x - x_hat| gets bright, lesion-like blobs; a small ViT learns to tell the difference
maps of such pseudo-abnormal reconstructions from normal ones. Its probability is the slice score; the
pixel map is the residual (as in the paper), normalised like every slice model's.

The pixel map's AUPRC cannot see the classifier, so training keeps the checkpoint with the best slice AUROC on the
validation subjects' synthetic anomalies (``selection_score``). Stage 1 is frozen, so what the classifier learns from
is made once, before the first step (``training_slices``), not at every step. There the paper's classifier scores
0.755 (the bundled one before, trained 600 steps of 16) and stalls (0.736 after 1500 steps of 64; boxes painted into
the slice instead of dimmed in the reconstruction: 0.754 at best), while the 99th percentile of the map in each slice,
the score ``uad detect`` gives models without a classifier, reaches 0.849: |x - x_hat| of a blurry stage 1 is as
bright at every cortical edge as in a 20 mm anomaly. With ``classifier_input="anomaly-map"`` the same ViT reads the
z-scored map instead (edges divided out by healthy statistics), median-filtered as segmentation filters it, and learns
from synthetic anomalies painted into the training volumes and mapped by stage 1 as at inference (two per volume:
~10 min on 2 cores before training). The bundled weights are trained so (model card).
ViT: 8 px patches (120 tokens), 4 layers, width 64: 0.15 M parameters.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from uad.errors import UserInputError
from uad.models.base import LossOutput
from uad.models.registry import register
from uad.models.slicewise import MIN_BRAIN_FRACTION, brain_slices_from_volumes, to_slices
from uad.models.swin_mae import SwinMAEConfig, SwinMAEModel
from uad.postprocessing import median_filter
from uad.preprocessing import WORKING_GRID
from uad.synthetic import add_synthetic_anomaly

CLASSIFIER_INPUTS = ("difference", "anomaly-map")


@dataclass(frozen=True)
class MAEClassifierConfig(SwinMAEConfig):
    name: ClassVar[str] = "mae-classifier"
    classifier_patch: int = 8
    classifier_width: int = 64
    classifier_layers: int = 4
    classifier_heads: int = 4
    max_boxes: int = 10
    box_side_px: tuple[int, int] = (4, 24)  # 8-48 mm on the 2 mm grid
    # What the classifier reads. "difference" (Georgescu): |x - x_hat|, trained on pseudo-abnormal reconstructions.
    # "anomaly-map": the z-scored map, median-filtered as segmentation filters it, trained on synthetic anomalies
    # painted into the healthy training volumes (anomalies_per_volume each) and read by stage 1 as at inference.
    # |x - x_hat| of a blurry stage 1 is as bright at every cortical edge as in a 20 mm anomaly; the map has those
    # edges divided out by healthy statistics.
    classifier_input: str = "difference"
    anomalies_per_volume: int = 2
    map_median_mm: float = 5.0

    def __post_init__(self):
        if self.classifier_input not in CLASSIFIER_INPUTS:
            raise UserInputError(f"classifier_input is one of {list(CLASSIFIER_INPUTS)}; got {self.classifier_input!r}")
        if self.anomalies_per_volume < 1:
            raise UserInputError(f"anomalies_per_volume is at least 1; got {self.anomalies_per_volume}")


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
    selection_score = "slice_auroc"
    description = ("MAE + anomaly classifier (Georgescu): a ViT scores each slice of the residual (the paper's) or "
                   "of the z-scored map; the map is the residual.")

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

    def score_slices(self, images, reconstructions, masks) -> torch.Tensor | None:
        if self.config.classifier_input == "anomaly-map":
            return None  # scored in ``predict``, once the whole map is z-scored
        return torch.sigmoid(self.classifier((images - reconstructions).abs() * masks))

    @torch.inference_mode()
    def predict(self, image, brain_mask, mask_size_px=None, batch_size=16, progress=None, mask_mode="sliding"):
        prediction = super().predict(image, brain_mask, mask_size_px, batch_size, progress, mask_mode)
        if self.config.classifier_input == "anomaly-map":
            slices = to_slices(self.classifier_map(prediction.anomaly_map, brain_mask))
            has_brain = to_slices(brain_mask.astype(np.float32)).mean(axis=(1, 2, 3)) >= MIN_BRAIN_FRACTION
            scores = np.zeros(len(slices), np.float32)  # slices without brain: not anomalous
            device, brain_slices = next(self.parameters()).device, np.flatnonzero(has_brain)
            for start in range(0, len(brain_slices), batch_size):
                index = brain_slices[start:start + batch_size]
                logits = self.classifier(torch.from_numpy(slices[index]).to(device))
                scores[index] = torch.sigmoid(logits).float().cpu().numpy()
            prediction.slice_scores = scores
        return prediction

    def classifier_map(self, anomaly_map: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
        """What the "anomaly-map" classifier reads: the map median-filtered as segmentation filters it, z-scores
        clipped to 0..20 and divided by 10."""
        filtered = median_filter(anomaly_map, brain_mask, (WORKING_GRID.spacing,) * 3, self.config.map_median_mm)
        return (np.clip(filtered, 0, 20) / 10).astype(np.float32)

    @torch.inference_mode()
    def training_slices(self, volumes: np.ndarray, masks: np.ndarray, direction: str = "axial",
                        batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(M, 2, H, W) slices and their (M, 1, H, W) brain masks, made once before the first step (stage 1 is
        frozen, so recomputing it at every step would only cost time: ~30 ms a slice on 2 cores).

        "difference": each healthy slice and stage 1's reconstruction of it, in inference mode as ``predict``
        makes it; training augments both channels alike (flips, intensity scale). "anomaly-map": the classifier's
        map of each volume with synthetic anomalies painted in (uad.synthetic, from the training seed's stream),
        and their truth."""
        was_training = self.training
        self.eval()
        if self.config.classifier_input == "difference":
            slices, slice_masks = super().training_slices(volumes, masks, direction)
            device = next(self.parameters()).device
            reconstructions = np.empty_like(slices)
            for start in tqdm(range(0, len(slices), batch_size), desc="stage-1 reconstructions", file=sys.stderr):
                x, m = (torch.from_numpy(a[start:start + batch_size]).to(device) for a in (slices, slice_masks))
                reconstructions[start:start + batch_size] = self.reconstruct(x, m).float().cpu().numpy()
            inputs = np.concatenate([slices, reconstructions], axis=1)
        else:
            rng = np.random.default_rng(int(torch.randint(2**31, ())))
            maps, truths, mask_slices = [], [], []
            for volume, mask in tqdm(list(zip(volumes, masks)), desc="maps of synthetic anomalies", file=sys.stderr):
                for _ in range(self.config.anomalies_per_volume):
                    modified, truth = add_synthetic_anomaly(volume, mask, rng, spacing_mm=WORKING_GRID.spacing)
                    # Stage 1's map only: this class's predict would also run the classifier being trained.
                    classifier_map = self.classifier_map(super().predict(modified, mask).anomaly_map, mask)
                    (map_slices, brain), (truth_slices, _) = (
                        brain_slices_from_volumes(v[None], mask[None], direction)
                        for v in (classifier_map, truth.astype(np.float32)))
                    maps.append(map_slices)
                    truths.append(truth_slices)
                    mask_slices.append(brain)
            inputs = np.concatenate([np.concatenate(maps), np.concatenate(truths)], axis=1)
            slice_masks = np.concatenate(mask_slices)
        self.train(was_training)
        return inputs, slice_masks

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> LossOutput:
        if self.config.classifier_input == "anomaly-map":  # (map, truth) pairs from training_slices
            abnormal = images[:, 1].flatten(1).amax(dim=1) > 0
            logits = self.classifier(images[:, :1])
        else:
            with torch.no_grad():
                if images.shape[1] == 2:  # stage 1's reconstructions come with the slices (training_slices)
                    images, reconstructions = images[:, :1], images[:, 1:]
                else:
                    reconstructions = self.reconstruct(images, masks)
                abnormal = torch.rand(len(images), device=images.device) < 0.5
                pseudo = self.pseudo_abnormal(reconstructions, masks) * masks
                reconstructions = torch.where(abnormal[:, None, None, None], pseudo, reconstructions)
            logits = self.classifier((images - reconstructions).abs() * masks)
        bce = F.binary_cross_entropy_with_logits(logits, abnormal.float())
        accuracy = ((logits > 0) == abnormal).float().mean()
        return LossOutput(bce, {"bce": bce.item(), "accuracy": accuracy.item()})
