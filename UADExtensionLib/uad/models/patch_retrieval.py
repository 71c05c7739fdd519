"""A training-free normative model: the pseudo-healthy value of a voxel is retrieved from healthy scans.

The healthy training scans, registered to the same working grid, are kept in the checkpoint (8-bit, compressed).
For a new scan, the ``neighbours`` training scans most similar to it (sum of squared differences in its brain)
are searched: for every voxel, patches of ``patch_size``^3 voxels around every position within
``search_radius`` voxels in each of them, and the centre values of the ``best_matches`` most similar patches
are averaged. Healthy tissue always finds a close healthy match, so the reconstruction is sharp (no
bottleneck blur); an anomaly finds none, so it is replaced by the closest healthy tissue. The map is the
residual (plus the structural term of the other models), z-scored against healthy voxel statistics fitted
leave-one-out over the stored scans, like every other map here.

Its known weakness (EVALUATION.md): small patches can copy dark CSF into a dark, flat anomaly. Larger patches see
more context; ``patch_size`` was chosen on the validation subjects (see the model card).
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from uad.models.base import AnomalyModel, ModelConfig, Prediction
from uad.models.registry import register
from uad.models.scoring import combined_anomaly_map, healthy_map_statistics, standardise_map
from uad.models.slicewise import from_slices, to_slices

LEVELS = 170.0  # 8-bit storage: 1/170 of the brain's 99th percentile per step, far below scan noise


@dataclass(frozen=True)
class PatchRetrievalConfig(ModelConfig):
    name: ClassVar[str] = "patch-retrieval"
    grid_shape: tuple[int, int, int] = (80, 96, 80)
    patch_size: int = 3  # voxels per side of the compared patch (odd)
    search_radius: int = 1  # voxels searched around the same position, per axis
    search_diagonals: bool = False  # the whole cube of offsets (27 at radius 1) or only along the axes (7): 4x faster
    neighbours: int = 6  # stored scans searched per new scan: the most similar ones
    best_matches: int = 3  # centre values averaged into the pseudo-healthy value
    max_subjects: int = 50  # stored healthy scans, evenly spread over the training list: ~12 MB in the checkpoint
    statistics_subjects: int = 35  # training scans the healthy map statistics are fitted on (each costs a search)
    ssim_weight: float = 0.5
    per_scan_standardise: bool = True


@register(PatchRetrievalConfig)
class PatchRetrievalModel(AnomalyModel):
    trainable = False
    family = "normative"
    description = ("Patch retrieval (training-free): each voxel is replaced by its best-matching patches from the "
                   "most similar healthy scans; the difference is the anomaly.")

    config: PatchRetrievalConfig

    def __init__(self, config: PatchRetrievalConfig):
        super().__init__()
        self.config = config
        self.register_buffer("atlas_blob", torch.zeros(0, dtype=torch.uint8))  # compressed npz of the stored scans
        self.register_buffer("map_mean", torch.zeros(config.grid_shape))
        self.register_buffer("map_std", torch.ones(config.grid_shape))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # The stored scans' size depends on how well they compress: take the saved buffer as it is.
        self.atlas_blob = state_dict["atlas_blob"].clone()
        self.__dict__.pop("atlas", None)
        rest = {k: v for k, v in state_dict.items() if k != "atlas_blob"}
        return super().load_state_dict({**rest, "atlas_blob": self.atlas_blob}, strict=strict, assign=assign)

    # --- fitting: store the healthy scans, then the healthy statistics of the map, leave-one-out -------------------
    def fit(self, volumes: np.ndarray, masks: np.ndarray) -> None:
        kept = np.unique(np.linspace(0, len(volumes) - 1, min(self.config.max_subjects, len(volumes))).round()
                         .astype(int))
        images = np.round(np.clip(volumes[kept] * masks[kept], 0, 255 / LEVELS) * LEVELS).astype(np.uint8)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, images=images, masks=np.packbits(masks[kept].astype(bool)), source_index=kept)
        self.atlas_blob = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8).clone()
        self.__dict__.pop("atlas", None)

    @torch.inference_mode()
    def fit_map_statistics(self, volumes: np.ndarray, masks: np.ndarray, progress=None) -> None:
        """Healthy map statistics over the training volumes, each searched among the *other* stored scans."""
        source_index = self.atlas["source_index"]
        used = np.linspace(0, len(volumes) - 1, min(self.config.statistics_subjects, len(volumes))).round().astype(int)

        def raw_maps():
            for index in used:
                image, mask = volumes[index], masks[index]
                own = np.flatnonzero(source_index == index)
                yield self._raw_prediction(image, mask, exclude=int(own[0]) if own.size else None).anomaly_map, mask
                if progress:
                    progress((index + 1) / len(volumes))

        mean, std = healthy_map_statistics(raw_maps(), self.config.grid_shape)
        self.map_mean.copy_(torch.from_numpy(mean))
        self.map_std.copy_(torch.from_numpy(std))

    @cached_property
    def atlas(self) -> dict:
        """The stored scans, decoded once: (N, X, Y, Z) float32 images on the model's device, and their indices."""
        with np.load(io.BytesIO(self.atlas_blob.cpu().numpy().tobytes())) as arrays:
            images = torch.from_numpy(arrays["images"].astype(np.float32) / LEVELS)
            return {"images": images.to(self.map_mean.device), "source_index": arrays["source_index"]}

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("atlas", None)  # decoded again on the new device
        return super()._apply(fn, recurse)

    # --- inference ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, image, brain_mask, mask_size_px=None, batch_size=16, progress=None) -> Prediction:
        prediction = self._raw_prediction(image, brain_mask, progress=progress)
        prediction.anomaly_map = standardise_map(prediction.anomaly_map, brain_mask, self.map_mean.cpu().numpy(),
                                                 self.map_std.cpu().numpy(), self.config.per_scan_standardise)
        return prediction

    def _raw_prediction(self, image: np.ndarray, brain_mask: np.ndarray, exclude: int | None = None,
                        progress=None) -> Prediction:
        device = self.map_mean.device
        x = torch.from_numpy(np.asarray(image, np.float32)).to(device)
        mask = torch.from_numpy(np.asarray(brain_mask, np.float32)).to(device)
        x = x * mask
        pseudo = self.pseudo_healthy(x, mask, exclude, progress) * mask
        images, masks, recons = (torch.from_numpy(to_slices(v.cpu().numpy())) for v in (x, mask, pseudo))
        residual, anomaly = combined_anomaly_map(images, recons, masks, self.config.ssim_weight)
        return Prediction(reconstruction=pseudo.cpu().numpy(), residual=from_slices(residual.numpy()),
                          anomaly_map=from_slices(anomaly.numpy()))

    def pseudo_healthy(self, x: torch.Tensor, mask: torch.Tensor, exclude: int | None = None,
                       progress=None) -> torch.Tensor:
        """(X, Y, Z) pseudo-healthy volume: the mean centre value of the best-matching healthy patches.

        Each of the ``neighbours`` most similar stored scans offers, per voxel, its best patch within the search
        window; the ``best_matches`` closest of those offers are averaged. Only the brain's bounding box is searched.
        """
        config = self.config
        atlas = self.atlas["images"]
        distance_to_scan = (((atlas - x) ** 2) * mask).sum(dim=(1, 2, 3))
        if exclude is not None:
            distance_to_scan[exclude] = float("inf")
        chosen = torch.argsort(distance_to_scan)[: min(config.neighbours, len(atlas) - (exclude is not None))]
        radius, pad = config.search_radius, config.patch_size // 2
        box = _bounding_box(mask, margin=pad)
        x_box = x[box]
        # The candidates' box grown by the search radius: each shift is then a view into it, not a copy.
        grown = tuple(slice(b.start - radius, b.stop + radius) for b in box)
        candidates = F.pad(atlas[chosen], (radius,) * 6)[(slice(None), *(slice(g.start + radius, g.stop + radius)
                                                                            for g in grown))]
        best_distance = torch.full((len(chosen), *x_box.shape), float("inf"), device=x.device)
        best_value = torch.zeros_like(best_distance)
        shifts = [s for s in itertools.product(range(2 * radius + 1), repeat=3)
                  if config.search_diagonals or sum(v != radius for v in s) <= 1]
        size = x_box.shape
        for number, (i, j, k) in enumerate(shifts):
            shifted = candidates[:, i:i + size[0], j:j + size[1], k:k + size[2]]
            distance = F.avg_pool3d(((shifted - x_box) ** 2)[:, None], config.patch_size, stride=1, padding=pad,
                                    count_include_pad=False)[:, 0]
            better = distance < best_distance
            best_distance = torch.where(better, distance, best_distance)
            best_value = torch.where(better, shifted, best_value)
            if progress:
                progress((number + 1) / len(shifts))
        closest = torch.topk(best_distance, min(config.best_matches, len(candidates)), dim=0, largest=False).indices
        pseudo = torch.zeros_like(x)
        pseudo[box] = torch.gather(best_value, 0, closest).mean(dim=0)
        return pseudo


def _bounding_box(mask: torch.Tensor, margin: int) -> tuple[slice, ...]:
    """Slices of the mask's bounding box grown by ``margin`` voxels (clipped to the volume)."""
    box = []
    for axis in range(mask.dim()):
        other = tuple(a for a in range(mask.dim()) if a != axis)
        present = torch.nonzero(mask.amax(dim=other) > 0).flatten()
        if present.numel() == 0:
            return tuple(slice(0, 0) for _ in range(mask.dim()))
        box.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)
