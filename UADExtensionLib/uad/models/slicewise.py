"""Shared inference for 2D models: slices of the working grid (axial unless configured), batched, brain slices only.

After training, :meth:`SliceModel.fit_map_statistics` records the voxel-wise mean and spread of the anomaly map
over healthy training brains; ``predict`` then reports how far each voxel's map value lies above what is usual
*at that place* (a z-score, clipped at 0). Reconstruction error is not uniform across a healthy brain (cortex
and ventricle edges are always harder to reconstruct), and dividing it out tripled the validation AUPRC of a
half-trained VQ-VAE here (0.06 -> 0.19).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from uad.errors import UserInputError
from uad.models.base import AnomalyModel, ModelConfig, Prediction
from uad.models.scoring import combined_anomaly_map, healthy_map_statistics, standardise_map

MIN_BRAIN_FRACTION = 0.01  # slices with less brain than this are left at 0 (nothing to reconstruct)
# The working-grid axis each slice direction cuts across (the grid is X left-right, Y back-front, Z foot-head).
READING_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def statistics_names(direction: str) -> tuple[str, str]:
    """The buffers holding a reading direction's healthy map mean and spread (axial's keep their first names)."""
    suffix = "" if direction == "axial" else f"_{direction}"
    return f"map_mean{suffix}", f"map_std{suffix}"


MAP_STATISTICS = tuple(name for direction in READING_AXES for name in statistics_names(direction))


@dataclass(frozen=True)
class SliceConfig(ModelConfig):
    grid_shape: tuple[int, int, int] = (80, 96, 80)  # the working grid the map statistics live on
    ssim_weight: float = 0.5  # weight of the (1 - SSIM) term in the anomaly map
    normalise_map: bool = True  # divide by healthy voxel-wise map statistics once they are fitted
    per_scan_standardise: bool = True  # then re-centre on the scan's own brain median, in units of its MAD
    # Run the scan and its left-right mirror image and average the two predictions (the mirror's flipped back): the
    # brain is nearly symmetric, so both are plausible inputs, and their errors on healthy tissue partly cancel while
    # a lesion is replaced in both. Twice the network time; the map statistics stay those of one pass.
    mirror_averaging: bool = False
    # Slice directions read, and each one's weight in the averaged map. A network trained on axial slices also
    # reconstructs coronal and sagittal ones, less well but with errors elsewhere on healthy tissue, while a lesion
    # looks wrong from every side. Each direction is z-scored on its own healthy statistics. Slice scores (per axial
    # slice) come from the axial reading alone. For the dae, axial/coronal/sagittal at 0.6/0.2/0.2 raised the fusion's
    # validation score from 0.490 to 0.502 at 3x the network time (Resources/reading-directions-validation.txt); once
    # it was trained on all three, 0.4/0.3/0.3 scored best (tools/compare_reading_weights.py).
    reading_directions: tuple[str, ...] = ("axial",)
    reading_weights: tuple[float, ...] = (1.0,)
    # The readings' anomaly maps are averaged by a weighted power mean of this exponent (1: the arithmetic mean).
    # Below 1, one reading's high z-score counts for less than the same total spread over all of them: a lesion looks
    # wrong from every side, a healthy edge mostly from the slice plane it lies in. For the dae, 0.5 raised the final
    # map's validation AUPRC from 0.769 to 0.775 at the same weights (tools/compare_reading_weights.py --powers).
    reading_power: float = 1.0
    # Slice directions the network is trained on: each training step draws its batch from one of them, at random.
    # A net that will read coronal and sagittal slices then learns them as well as axial ones.
    training_directions: tuple[str, ...] = ("axial",)


def to_slices(volume: np.ndarray, axis: int = 2) -> np.ndarray:
    """(X, Y, Z) -> (N, 1, H, W): one slice across ``axis`` per batch item, the other two axes in their order
    (axial: (Z, 1, X, Y))."""
    return np.ascontiguousarray(np.moveaxis(volume, axis, 0)[:, None])


def from_slices(slices: np.ndarray, axis: int = 2) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(slices[:, 0], 0, axis))


def brain_slices_from_volumes(volumes: np.ndarray, masks: np.ndarray, direction: str = "axial",
                              min_brain_fraction: float = 0.05):
    """(N, X, Y, Z) volumes -> (M, 1, H, W) slices in ``direction`` that contain brain, as inference cuts them."""
    axis = READING_AXES[direction]
    slices = np.concatenate([to_slices(volume, axis) for volume in volumes])
    slice_masks = np.concatenate([to_slices(mask, axis) for mask in masks])
    keep = slice_masks.mean(axis=(1, 2, 3)) >= min_brain_fraction
    return np.ascontiguousarray(slices[keep], np.float32), np.ascontiguousarray(slice_masks[keep], np.float32)


class SliceModel(AnomalyModel):
    """A model that reconstructs one (1, X, Y) slice at a time; subclasses implement ``reconstruct``."""

    config: SliceConfig
    reads_any_slice_shape = True  # False where the network is sized for axial slices only

    def __init__(self, config: SliceConfig):
        super().__init__()
        unknown = set(config.reading_directions) - set(READING_AXES)
        if unknown or not config.reading_directions or len(config.reading_weights) != len(config.reading_directions):
            raise UserInputError(f"reading_directions are some of {list(READING_AXES)}, with one reading_weights entry "
                                 f"each; got {list(config.reading_directions)} and {list(config.reading_weights)}")
        if not 0 < config.reading_power <= 1:
            raise UserInputError("reading_power is a power-mean exponent above 0 and at most 1; got "
                                 f"{config.reading_power}")
        if not config.training_directions or set(config.training_directions) - set(READING_AXES):
            raise UserInputError(f"training_directions are some of {list(READING_AXES)}; got "
                                 f"{list(config.training_directions)}")
        if not self.reads_any_slice_shape and {*config.reading_directions, *config.training_directions} != {"axial"}:
            raise UserInputError(f"{config.name} reads axial slices only (its network is sized for them); "
                                 "leave reading_directions and training_directions at [\"axial\"]")
        self.config = config
        for direction in dict.fromkeys(("axial", *config.reading_directions)):  # axial's always: old checkpoints
            for name in statistics_names(direction):
                self.register_buffer(name, torch.zeros(config.grid_shape))  # all zero = not fitted

    def reconstruct(self, images: torch.Tensor, masks: torch.Tensor, mask_size_px: int | None) -> torch.Tensor:
        raise NotImplementedError

    def training_slices(self, volumes: np.ndarray, masks: np.ndarray,
                        direction: str = "axial") -> tuple[np.ndarray, np.ndarray]:
        """The (M, C, H, W) arrays training batches are drawn from, and their (M, 1, H, W) brain masks: the brain
        slices of the healthy (N, X, Y, Z) volumes, unless a model learns from something it makes of them."""
        return brain_slices_from_volumes(volumes, masks, direction)

    def reconstruct_with_weight(self, images: torch.Tensor, masks: torch.Tensor,
                                mask_size_px: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(reconstruction, per-pixel weight of the anomaly map or None); models that know where to look override."""
        return self.reconstruct(images, masks, mask_size_px), None

    def score_slices(self, images: torch.Tensor, reconstructions: torch.Tensor,
                     masks: torch.Tensor) -> torch.Tensor | None:
        """(B,) anomaly score per slice, for models that score slices themselves; None for the others."""
        return None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # States saved during training, before the statistics are fitted, carry none: keep the unfitted ones.
        current = {name: value for name, value in self.state_dict().items() if name in MAP_STATISTICS}
        return super().load_state_dict({**current, **state_dict}, strict=strict, assign=assign)

    @property
    def map_statistics_fitted(self) -> bool:
        return all(getattr(self, statistics_names(d)[1]).any() for d in self.config.reading_directions)

    @torch.inference_mode()
    def fit_map_statistics(self, volumes: np.ndarray, masks: np.ndarray, progress=None) -> None:
        """Voxel-wise mean/std of the raw anomaly map over healthy (N, X, Y, Z) volumes, per reading direction."""
        directions = self.config.reading_directions

        def raw_maps(done: int, direction: str):
            for index, (image, mask) in enumerate(zip(volumes, masks)):
                yield self._raw_prediction(image, mask, None, 16, direction).anomaly_map, mask
                if progress:
                    progress((done + (index + 1) / len(volumes)) / len(directions))

        for done, direction in enumerate(directions):
            statistics = healthy_map_statistics(raw_maps(done, direction), self.config.grid_shape)
            for name, value in zip(statistics_names(direction), statistics):
                getattr(self, name).copy_(torch.from_numpy(value))

    @torch.inference_mode()
    def predict(self, image, brain_mask, mask_size_px=None, batch_size=16, progress=None) -> Prediction:
        return self.combine_readings(self.read_directions(image, brain_mask, mask_size_px, batch_size, progress))

    @torch.inference_mode()
    def read_directions(self, image, brain_mask, mask_size_px=None, batch_size=16, progress=None) -> list[Prediction]:
        """One prediction per reading direction, in the config's order, each z-scored on its own statistics."""
        directions = self.config.reading_directions
        readings = []
        for done, direction in enumerate(directions):
            share = (lambda f, done=done: progress((done + f) / len(directions))) if progress else None
            readings.append(self._mirror_averaged(image, brain_mask, mask_size_px, batch_size, share, direction))
        return readings

    def combine_readings(self, readings: list[Prediction]) -> Prediction:
        """The readings averaged by their weights; the anomaly map by the power mean of ``reading_power``."""
        shares = [weight / sum(self.config.reading_weights) for weight in self.config.reading_weights]
        outputs = {output: sum(getattr(reading, output) * share for reading, share in zip(readings, shares))
                   for output in ("reconstruction", "residual")}
        power = self.config.reading_power
        outputs["anomaly_map"] = sum(np.power(reading.anomaly_map, power) * share
                                     for reading, share in zip(readings, shares)) ** (1 / power)
        directions = self.config.reading_directions
        axial = readings[directions.index("axial")].slice_scores if "axial" in directions else None
        return Prediction(**outputs, slice_scores=axial)

    def _mirror_averaged(self, image, brain_mask, mask_size_px, batch_size, progress, direction) -> Prediction:
        if not self.config.mirror_averaging:
            return self._standardised_prediction(image, brain_mask, mask_size_px, batch_size, progress, direction)
        # Each pass is z-scored on its own, the mirror image's in its own frame (where its anatomy matches the
        # statistics), and then flipped back. Averaging the raw maps or the reconstructions instead, with statistics
        # fitted on those, scored lower on the validation cases (fused with retrieval, choose_fusion_weights' score;
        # exploratory: 0.486 against 0.492): z-scored passes weigh down voxels where the two passes disagree.
        halves = [lambda f: progress(f / 2), lambda f: progress(0.5 + f / 2)] if progress else [None, None]
        own = self._standardised_prediction(image, brain_mask, mask_size_px, batch_size, halves[0], direction)
        mirror = self._standardised_prediction(np.ascontiguousarray(image[::-1]),
                                               np.ascontiguousarray(brain_mask[::-1]), mask_size_px, batch_size,
                                               halves[1], direction)
        for output in ("reconstruction", "residual", "anomaly_map"):
            setattr(own, output, (getattr(own, output) + getattr(mirror, output)[::-1]) / 2)
        if own.slice_scores is not None:  # the mirror image has the same slices
            own.slice_scores = (own.slice_scores + mirror.slice_scores) / 2
        return own

    def _standardised_prediction(self, image, brain_mask, mask_size_px, batch_size, progress,
                                 direction: str) -> Prediction:
        prediction = self._raw_prediction(image, brain_mask, mask_size_px, batch_size, direction, progress)
        if self.config.normalise_map and self.map_statistics_fitted:
            mean, std = (getattr(self, name).cpu().numpy() for name in statistics_names(direction))
            prediction.anomaly_map = standardise_map(prediction.anomaly_map, brain_mask, mean, std,
                                                     self.config.per_scan_standardise)
        return prediction

    def _raw_prediction(self, image, brain_mask, mask_size_px, batch_size, direction: str,
                        progress=None) -> Prediction:
        device, axis = next(self.parameters()).device, READING_AXES[direction]
        images, masks = to_slices(image.astype(np.float32), axis), to_slices(brain_mask.astype(np.float32), axis)
        keep = np.flatnonzero(masks.mean(axis=(1, 2, 3)) >= MIN_BRAIN_FRACTION)
        outputs = {key: np.zeros_like(images) for key in ("reconstruction", "residual", "anomaly_map")}
        slice_scores = np.zeros(len(images), np.float32)  # slices without brain: not anomalous
        scored = False
        for start in range(0, len(keep), batch_size):
            index = keep[start:start + batch_size]
            x = torch.from_numpy(images[index]).to(device)
            m = torch.from_numpy(masks[index]).to(device)
            reconstruction, weight = self.reconstruct_with_weight(x, m, mask_size_px)
            residual, anomaly = combined_anomaly_map(x, reconstruction, m, self.config.ssim_weight)
            if weight is not None:
                anomaly = anomaly * weight
            scores = self.score_slices(x, reconstruction, m) if direction == "axial" else None  # per axial slice
            if scores is not None:
                slice_scores[index], scored = scores.float().cpu().numpy(), True
            outputs["reconstruction"][index] = reconstruction.float().cpu().numpy()
            outputs["residual"][index] = residual.float().cpu().numpy()
            outputs["anomaly_map"][index] = anomaly.float().cpu().numpy()
            if progress:
                progress(min(start + batch_size, len(keep)) / max(len(keep), 1))
        return Prediction(**{key: from_slices(value, axis) for key, value in outputs.items()},
                          slice_scores=slice_scores if scored else None)
