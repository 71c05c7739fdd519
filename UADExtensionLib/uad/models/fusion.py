"""Fusion: a weighted sum of other bundled models' z-scored anomaly maps, the weights optionally following intensity.

Detectors that fail differently add up (EVALUATION.md): the denoising autoencoder sees texture and contrast
changes but leaves noise-sized blobs on healthy brains; patch retrieval is clean away from lesions but can copy
dark CSF into a dark, flat anomaly. Every member's map is already in the same units (a z-score against healthy
voxel statistics, re-centred on the scan), so a weighted sum is meaningful without further scaling; an optional
Gaussian (``smoothing_sigma_voxels``) averages the DAE's noise-sized blobs away. The fusion is calibrated and
segmented without the 5 mm median filter other models use, which cost every validation Dice and blurred small
lesions away (``uad train --median-mm 0``); since patch retrieval got its coarse search, which is smooth already,
the bundled fusion uses no Gaussian either (Resources/fusion-weights-validation.txt). The weights, the Gaussian's
width and the median filter were chosen on the validation subjects (synthetic anomalies, stroke shapes, small stroke
shapes and scans with many small ones; never lesion cases) by AUPRC and by Dice at the healthy-calibrated
threshold, and the threshold is calibrated on healthy validation brains like any other model's.

The members are not equally good everywhere: the DAE lights up cortical edges that patch retrieval explains, and
patch retrieval passes over flat, tissue-like fills in white matter that the DAE sees. So the weights may follow
the voxel's own intensity (``intensity_anchors``, in units of the brain's 99th percentile, and one row of member
weights per anchor, interpolated linearly in between): on the validation cases a DAE weight of 0.5 at CSF-like,
0.2 at grey-matter-like and 0.7 at white-matter-like intensity scored 0.483 against 0.458 for one weight everywhere
(the bundled fusion, with the sharper dae of today, uses 0.7 / 0.3 / 1.0: Resources/fusion-weights-validation.txt;
the searches between are in Resources/reading-directions-validation.txt). A lesion's voxels take the weights of the
intensity they have, not of the tissue they replaced, which is what the validation lesions (painted darker than the
tissue) measured. Faint MS-like lesions in white matter (a fifth kind of validation case, added after these weights
were chosen) have median intensities of 0.68-0.79, where the DAE weighs 0.7-1.0 and barely sees them; a fourth
anchor there with more retrieval scored higher on validation, but within the noise of its subjects. The reverse
autoencoder as a third member (any number of members works) scored higher beyond that noise, by finding small lesions,
but lost stroke shapes' AUPRC and Dice on validation and on the test split, and the glioma's Dice: not bundled
(Resources/ms-like-validation.txt).

The members are not copied into this checkpoint (that would double the package): it names them and records
their SHA-256, and loading verifies that the bundled files are exactly those the fusion was fitted with.
The reconstruction and residual shown to the user are the first member's (a generative reconstruction).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
from scipy import ndimage

from uad.errors import UserInputError
from uad.models.base import AnomalyModel, ModelConfig, Prediction
from uad.models.registry import register


@dataclass(frozen=True)
class FusionConfig(ModelConfig):
    name: ClassVar[str] = "fusion"
    members: tuple[str, ...] = ("dae", "patch-retrieval")  # bundled model names; the first gives the reconstruction
    weights: tuple[float, ...] = (0.5, 0.5)
    # Gaussian sigma (working-grid voxels) on the weighted sum: the DAE leaves noise-sized blobs on healthy brains
    # that averaging removes; chosen on validation with small lesion shapes in the score, which smoothing hurts.
    smoothing_sigma_voxels: float = 0.0
    grid_shape: tuple[int, int, int] = (80, 96, 80)
    member_sha256: tuple[str, ...] = ()  # filled when fitted: the exact member files the weights were chosen for
    # Weights that follow the voxel's intensity (see the module docstring); empty: ``weights`` everywhere.
    intensity_anchors: tuple[float, ...] = ()  # increasing, in units of the brain's 99th percentile
    anchor_weights: tuple[tuple[float, ...], ...] = ()  # one row of member weights per anchor

    def __post_init__(self) -> None:
        # A checkpoint's JSON-like config gives the rows as lists.
        object.__setattr__(self, "anchor_weights", tuple(tuple(row) for row in self.anchor_weights))


@register(FusionConfig)
class FusionModel(AnomalyModel):
    trainable = False
    family = "fusion"
    description = ("Fusion: weighted sum of the denoising autoencoder's and patch retrieval's z-scored maps, the "
                   "weights following each voxel's intensity (more DAE in white matter, more retrieval in grey).")

    config: FusionConfig

    def __init__(self, config: FusionConfig):
        super().__init__()
        if len(config.members) != len(config.weights) or not config.members:
            raise UserInputError(f"fusion needs one weight per member; got members {list(config.members)} and "
                                 f"weights {list(config.weights)}")
        anchors = config.intensity_anchors
        if (len(config.anchor_weights) != len(anchors) or any(len(row) != len(config.members)
                                                              for row in config.anchor_weights)
                or list(anchors) != sorted(set(anchors))):
            raise UserInputError(f"fusion's intensity_anchors must increase, with one row of {len(config.members)} "
                                 f"member weights each in anchor_weights; got anchors {list(anchors)} and rows "
                                 f"{[list(row) for row in config.anchor_weights]}")
        self.config = config
        # Plain lists, not a ModuleList: the members' weights must not be saved into this checkpoint.
        self.members: list = []
        self.member_files: list[str] = []  # their SHA-256, as loaded
        self._device = torch.device("cpu")
        # Where some healthy training scan had brain; all True until fitted. Elsewhere the members' healthy
        # statistics are empty and their z-scores noise: the lowest cerebellar slices that another site's
        # skull-stripping keeps came out flagged whole on two of the fifteen MASS scans.
        self.register_buffer("support", torch.ones(config.grid_shape, dtype=torch.bool))

    def load_members(self) -> list:
        """The member models, loaded (and SHA-256-verified) from the bundle on first use."""
        if not self.members:
            from uad.checkpoint import load_checkpoint  # the checkpoint module imports this package
            from uad.inference import resolve_checkpoint_path

            for index, name in enumerate(self.config.members):
                checkpoint = load_checkpoint(resolve_checkpoint_path(name))
                expected = self.config.member_sha256[index] if self.config.member_sha256 else checkpoint.sha256
                if checkpoint.sha256 != expected:
                    raise UserInputError(f"the bundled '{name}' is not the one this fusion was fitted with (SHA-256 "
                                         f"{checkpoint.sha256[:12]}..., expected {expected[:12]}...); refit it with "
                                         "'uad train --model fusion'")
                self.members.append(checkpoint.model.to(self._device).eval())
                self.member_files.append(checkpoint.sha256)
        return self.members

    def _apply(self, fn, recurse=True):
        # .to(device) moves the members too (they are not submodules); an empty tensor tells where fn sends things.
        self._device = fn(torch.zeros(0)).device
        for member in self.members:
            member._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def fit(self, volumes: np.ndarray, masks: np.ndarray) -> None:
        """The weights come from validation; from the healthy scans, only where they have brain. Pins the members'
        exact files."""
        self.load_members()
        self.config = replace(self.config, member_sha256=tuple(self.member_files))
        self.support.copy_(torch.from_numpy(np.any(masks > 0, axis=0)))

    @torch.inference_mode()
    def predict(self, image, brain_mask, mask_size_px=None, batch_size=16, progress=None) -> Prediction:
        members = self.load_members()
        predictions = []
        for index, member in enumerate(members):
            step = (lambda f, i=index: progress((i + f) / len(members))) if progress else None
            predictions.append(member.predict(image, brain_mask, mask_size_px=mask_size_px, batch_size=batch_size,
                                              progress=step))
        return self.combine(predictions, image, brain_mask)

    def combine(self, predictions: list[Prediction], image: np.ndarray, brain_mask: np.ndarray) -> Prediction:
        """The fused prediction from the members' own (in member order); the evaluation reuses members' maps."""
        region = (brain_mask > 0) & self.support.cpu().numpy()
        fused = fuse_maps([p.anomaly_map for p in predictions], region, self.config, image)
        first = predictions[0]
        return Prediction(reconstruction=first.reconstruction, residual=first.residual, anomaly_map=fused)


def fuse_maps(maps: list[np.ndarray], region: np.ndarray, config: FusionConfig,
              image: np.ndarray | None = None) -> np.ndarray:
    """The weighted sum of the members' maps, smoothed, and zero outside ``region`` (the brain); ``image`` (the
    working-grid scan) is needed when the weights follow intensity."""
    fused = sum(w * np.asarray(m, np.float32) for w, m in zip(member_weights(config, image, region), maps))
    if config.smoothing_sigma_voxels > 0:
        fused = ndimage.gaussian_filter(fused, config.smoothing_sigma_voxels)
    return np.asarray(fused * (region > 0), np.float32)


def member_weights(config: FusionConfig, image: np.ndarray | None, region: np.ndarray) -> list:
    """Each member's weight: a number, or a voxel-wise array where the weights follow intensity."""
    if not config.intensity_anchors:
        return list(config.weights)
    if image is None:
        raise ValueError("this fusion's weights follow intensity: fuse_maps needs the image")
    # Preprocessing already scales the template brain's 99th percentile to 1; measured again here on the fused
    # region, so that the weights do not depend on which mask the caller normalised with.
    brain = region > 0
    reference = np.percentile(image[brain], 99) if brain.any() else 1.0
    intensity = np.asarray(image, np.float32) / max(float(reference), 1e-6)
    return [np.interp(intensity, config.intensity_anchors, column).astype(np.float32)
            for column in zip(*config.anchor_weights)]
