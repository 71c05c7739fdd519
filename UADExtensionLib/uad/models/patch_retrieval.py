"""A training-free normative model: the pseudo-healthy value of a voxel is retrieved from healthy scans.

The healthy training scans, registered to the same working grid, are kept in the checkpoint (8-bit, compressed).
For a new scan, the ``neighbours`` training scans most similar to it (sum of squared differences in its brain)
are searched: for every voxel, patches of ``patch_size``^3 voxels around every position within
``search_radius`` voxels in each of them, and the centre values of the ``best_matches`` most similar patches
are averaged. Healthy tissue always finds a close healthy match, so the reconstruction is sharp (no
bottleneck blur); an anomaly finds none, so it is replaced by the closest healthy tissue. The map is the
residual (plus the structural term of the other models), z-scored against healthy voxel statistics fitted
leave-one-out over the stored scans, like every other map here.

Its known weakness (EVALUATION.md): small patches can copy dark CSF into a dark, flat anomaly. Larger patches at
full resolution did not help (``patch_size`` 3 vs 5, Resources/patch-settings-validation.txt). What does is a second
search on a coarse grid (4 mm voxels, 5-voxel patches: 20 mm of context, +-2 voxels): a lesion's flat interior then
has to match a whole healthy neighbourhood, which a dark cavity does not. Its residual, z-scored on its own healthy
statistics, is averaged with the fine map (``coarse_weight``). On the validation cases this raised the score of
patch retrieval alone from 0.375 to 0.411 and of its fusion with the dae from 0.437 to 0.454
(Resources/patch-scales-validation.txt), at well under a second per scan.

Retrieval compares raw intensities, so it is the model most hurt by a scan from another site whose brain N4 left
darker in places (the TCGA glioma scan here: 0.5 of the healthy level at the bottom of the brain, 0.85 at the top;
the whole cerebellum was flagged). With ``intensity_field_degree`` the smooth field by which the scan departs from
the stored scans' mean is fitted (a low-degree polynomial, robust to a focal lesion) and divided out before the
search; the reconstruction is brought back to the scan's own intensities. On the validation cases moved to another
site's intensity field (tools/compare_intensity_fields.py, Resources/intensity-fields-validation.txt) degree 2 raised
the fusion's score from 0.422 to 0.457 and cut the flagged volume of clean shifted scans from 11.1 to 5.3 ml, at a
cost of 0.007 on the clean cases (0.462 -> 0.455); the bundled model has degree 2.
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

from uad.errors import UserInputError
from uad.models.base import AnomalyModel, ModelConfig, Prediction
from uad.models.registry import register
from uad.models.scoring import combined_anomaly_map, healthy_map_statistics, standardise_map
from uad.models.slicewise import from_slices, to_slices
from uad.preprocessing import reference_intensity_field

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
    # The coarse search (see the module docstring); its grid, patch and radius are counted in coarse voxels.
    coarse_weight: float = 0.5  # share of the coarse map in the anomaly map; 0 = the fine search alone
    coarse_factor: int = 2  # working-grid voxels averaged per coarse voxel and axis: 2 mm -> 4 mm
    coarse_patch_size: int = 5
    coarse_search_radius: int = 2
    # Degree of the smooth intensity field divided out of a scan before the search, fitted against the stored
    # scans' mean (preprocessing.reference_intensity_field); 0 = none. Retrieval compares raw intensities, so a
    # scan whose brain N4 left darker at the bottom finds no healthy match anywhere there.
    intensity_field_degree: int = 2
    # Its statistics were fitted without a field: correcting its inputs now would misread every scan.
    predating_defaults: ClassVar[dict] = {"intensity_field_degree": 0}


@register(PatchRetrievalConfig)
class PatchRetrievalModel(AnomalyModel):
    trainable = False
    family = "normative"
    description = ("Patch retrieval (training-free): each voxel is replaced by its best-matching patches from the "
                   "most similar healthy scans; the difference is the anomaly.")

    config: PatchRetrievalConfig

    def __init__(self, config: PatchRetrievalConfig):
        if not 0 <= config.coarse_weight <= 1:
            raise UserInputError(f"coarse_weight is the coarse map's share, between 0 and 1; "
                                 f"got {config.coarse_weight}")
        if config.coarse_factor < 1:
            raise UserInputError(f"coarse_factor is voxels per coarse voxel, at least 1; got {config.coarse_factor}")
        super().__init__()
        self.config = config
        self.register_buffer("atlas_blob", torch.zeros(0, dtype=torch.uint8))  # compressed npz of the stored scans
        self.register_buffer("map_mean", torch.zeros(config.grid_shape))
        self.register_buffer("map_std", torch.ones(config.grid_shape))
        # The coarse map's statistics are kept on the coarse grid (1/8 of the voxels: the checkpoint stays under
        # 20 MB) and brought to the working grid when used.
        self.register_buffer("coarse_map_mean", torch.zeros(self.coarse_shape))
        self.register_buffer("coarse_map_std", torch.ones(self.coarse_shape))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.config.coarse_weight > 0 and "coarse_map_std" not in state_dict:
            raise UserInputError("this patch-retrieval checkpoint was fitted before the coarse search existed; "
                                 "refit it with 'uad train --model patch-retrieval'")
        # The stored scans' size depends on how well they compress: take the saved buffer as it is.
        self.atlas_blob = state_dict["atlas_blob"].clone()
        self.__dict__.pop("atlas", None)
        self.__dict__.pop("coarse_atlas", None)
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
        self.__dict__.pop("coarse_atlas", None)

    @torch.inference_mode()
    def fit_map_statistics(self, volumes: np.ndarray, masks: np.ndarray, progress=None) -> None:
        """Healthy statistics of the fine (and coarse) map over training volumes, each searched among the *other*
        stored scans."""
        def fine(image, mask, exclude):
            return self._raw_prediction(image, mask, exclude).anomaly_map, mask

        mean, std = self.healthy_statistics_of(fine, self.config.grid_shape, volumes, masks, progress)
        self.map_mean.copy_(torch.from_numpy(mean))
        self.map_std.copy_(torch.from_numpy(std))
        if self.config.coarse_weight > 0:
            self.fit_coarse_statistics(volumes, masks)

    @torch.inference_mode()
    def fit_coarse_statistics(self, volumes: np.ndarray, masks: np.ndarray) -> None:
        """The coarse map's healthy statistics alone (a second of work per scan; tools/compare_patch_scales.py)."""
        mean, std = self.healthy_statistics_of(self.coarse_raw_map, self.coarse_shape, volumes, masks)
        self.coarse_map_mean.copy_(torch.from_numpy(mean))
        self.coarse_map_std.copy_(torch.from_numpy(std))

    def healthy_statistics_of(self, raw_map, shape: tuple[int, ...], volumes: np.ndarray, masks: np.ndarray,
                              progress=None):
        """Voxel-wise (mean, std) of the map of ``raw_map(image, mask, exclude) -> (map, its brain mask)`` over
        ``statistics_subjects`` training volumes, leave-one-out: a stored scan would find itself and have no error."""
        source_index = self.atlas["source_index"]
        used = np.linspace(0, len(volumes) - 1, min(self.config.statistics_subjects, len(volumes))).round().astype(int)

        def raw_maps():
            for index in used:
                own = np.flatnonzero(source_index == index)
                image, _ = self.matched_to_healthy(volumes[index], masks[index])
                yield raw_map(image, masks[index], int(own[0]) if own.size else None)
                if progress:
                    progress((index + 1) / len(volumes))

        return healthy_map_statistics(raw_maps(), shape)

    @property
    def coarse_shape(self) -> tuple[int, ...]:
        return tuple(n // self.config.coarse_factor for n in self.config.grid_shape)

    @cached_property
    def atlas(self) -> dict:
        """The stored scans, decoded once: (N, X, Y, Z) float32 images on the model's device, and their indices."""
        with np.load(io.BytesIO(self.atlas_blob.cpu().numpy().tobytes())) as arrays:
            images = torch.from_numpy(arrays["images"].astype(np.float32) / LEVELS)
            stored = images.numpy()
            healthy_mean = stored.sum(axis=0) / np.maximum((stored > 0).sum(axis=0), 1)
            return {"images": images.to(self.map_mean.device), "source_index": arrays["source_index"],
                    "healthy_mean": healthy_mean}

    def matched_to_healthy(self, image: np.ndarray, brain_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(``image`` with its smooth intensity field against the stored scans divided out, that field); the image
        unchanged and a field of ones when ``intensity_field_degree`` is 0."""
        if self.config.intensity_field_degree <= 0:
            return np.asarray(image, np.float32), np.ones(np.shape(image), np.float32)
        field = reference_intensity_field(np.asarray(image, np.float32), brain_mask > 0, self.atlas["healthy_mean"],
                                          self.config.intensity_field_degree)
        return (image / field).astype(np.float32), field

    @cached_property
    def coarse_atlas(self) -> torch.Tensor:
        """The stored scans on the coarse grid, (N, X / f, Y / f, Z / f)."""
        return F.avg_pool3d(self.atlas["images"][:, None], self.config.coarse_factor)[:, 0]

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("atlas", None)  # decoded again on the new device
        self.__dict__.pop("coarse_atlas", None)
        return super()._apply(fn, recurse)

    # --- inference ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, image, brain_mask, mask_size_px=None, batch_size=16, progress=None) -> Prediction:
        image, field = self.matched_to_healthy(image, brain_mask)
        prediction = self._raw_prediction(image, brain_mask, progress=progress)
        prediction.reconstruction = (prediction.reconstruction * field).astype(np.float32)  # in the scan's intensity
        anomaly = standardise_map(prediction.anomaly_map, brain_mask, self.map_mean.cpu().numpy(),
                                  self.map_std.cpu().numpy(), self.config.per_scan_standardise)
        weight = self.config.coarse_weight
        if weight > 0:
            anomaly = (1 - weight) * anomaly + weight * self.coarse_map(image, brain_mask)
        prediction.anomaly_map = anomaly.astype(np.float32)
        return prediction

    def coarse_map(self, image: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
        """The coarse search's z-scored map, on the working grid.

        The residual and its healthy statistics are brought to the working grid first and z-scored there, over the
        fine brain mask. Z-scoring on the coarse grid and upsampling the result scored lower on the validation cases
        (fused with the dae: 0.446 against 0.454, mostly on small shapes; exploratory, not in a tool).
        """
        raw = self.to_working_grid(self.coarse_raw_map(image, brain_mask)[0], brain_mask)
        mean, std = (self.to_working_grid(s.cpu().numpy(), brain_mask) for s in (self.coarse_map_mean,
                                                                                  self.coarse_map_std))
        # Upsampling zeroes the spread outside the brain; floor it at the smallest fitted value to never divide by 0.
        return standardise_map(raw, brain_mask, mean, np.maximum(std, self.coarse_map_std.min().item()),
                               self.config.per_scan_standardise)

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
        """(X, Y, Z) pseudo-healthy volume from the fine search (the reconstruction shown to the user)."""
        return _retrieve(self.atlas["images"], x, mask, self.config, self.config.patch_size,
                         self.config.search_radius, exclude, progress)

    @torch.inference_mode()
    def coarse_raw_map(self, image: np.ndarray, brain_mask: np.ndarray,
                       exclude: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(residual of the coarse search, its brain mask), both on the coarse grid."""
        device = self.map_mean.device
        mask = torch.from_numpy(np.asarray(brain_mask, np.float32)).to(device)
        x = torch.from_numpy(np.asarray(image, np.float32)).to(device) * mask
        factor = self.config.coarse_factor
        x_coarse = F.avg_pool3d(x[None, None], factor)[0, 0]
        mask_coarse = (F.avg_pool3d(mask[None, None], factor)[0, 0] > 0.5).float()
        x_coarse = x_coarse * mask_coarse
        pseudo = _retrieve(self.coarse_atlas, x_coarse, mask_coarse, self.config, self.config.coarse_patch_size,
                           self.config.coarse_search_radius, exclude)
        residual = (x_coarse - pseudo).abs() * mask_coarse
        return residual.cpu().numpy(), mask_coarse.cpu().numpy()

    def to_working_grid(self, coarse_map: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
        """A coarse-grid map back on the working grid (trilinear), 0 outside the brain."""
        upsampled = F.interpolate(torch.from_numpy(coarse_map)[None, None], size=tuple(brain_mask.shape),
                                  mode="trilinear", align_corners=False)[0, 0].numpy()
        return (upsampled * (brain_mask > 0)).astype(np.float32)


def _retrieve(atlas: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, config: PatchRetrievalConfig,
              patch_size: int, radius: int, exclude: int | None = None, progress=None) -> torch.Tensor:
    """(X, Y, Z) pseudo-healthy volume: the mean centre value of the best-matching patches of ``atlas`` scans.

    Each of the ``neighbours`` most similar stored scans offers, per voxel, its best patch within ``radius`` voxels;
    the ``best_matches`` closest of those offers are averaged. Only the brain's bounding box is searched.
    """
    distance_to_scan = (((atlas - x) ** 2) * mask).sum(dim=(1, 2, 3))
    if exclude is not None:
        distance_to_scan[exclude] = float("inf")
    chosen = torch.argsort(distance_to_scan)[: min(config.neighbours, len(atlas) - (exclude is not None))]
    pad = patch_size // 2
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
        distance = F.avg_pool3d(((shifted - x_box) ** 2)[:, None], patch_size, stride=1, padding=pad,
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
