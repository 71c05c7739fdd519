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

Coarse noise only ever teaches smooth intensity changes; a lesion also brings edges and a texture of its own, which
the net then leaves in place. With ``foreign_patch_probability`` some training slices also get foreign patch
interpolation (Tan et al. 2021, the restoration task of DISYRE): an irregular blob blended with the same place in
another slice, to be restored as well. Fine-tuning the coarse-noise weights this way for 5000 steps on the CPU raised
the validation AUPRC of the final map from 0.553 to 0.659 (the bundled weights; model card). Blobs in every slice
(probability 1, 2500 more steps) lifted the raw map's validation AUPRC again (0.60 -> 0.73) but neither the final
map's (0.633 -> 0.642 at the calibrated median filter) nor the fusion's validation score (0.4384 -> 0.4383); half stays.

The bundled weights run with ``mirror_averaging`` (SliceConfig): each scan's z-scored map is averaged with that of
its left-right mirror image. Same weights, statistics and threshold fitted again (``uad train --steps 0``): the
fusion's validation score rose from 0.483 to 0.492 (Resources/fusion-weights-validation.txt) and the validation
AUPRC of the dae's final map from 0.596 to 0.611 (exploratory, not in a tool; today's code does not reproduce the
0.659 its fine-tuning recorded), for 0.4 s more per scan on 2 cores. A one-voxel shift as a third and fourth pass
helped the dae alone but not the fusion (0.490).

The bundled weights also read the scan's coronal and sagittal slices (``reading_directions``, weighted 0.6 / 0.2 / 0.2
with the axial reading), each direction with its own mirror pass and its own healthy statistics: six network passes
per scan. The reason to expect a gain: a lesion lights up in all three readings, while the errors each makes on
healthy tissue (edges along its own slice plane) are partly its own, so the average quiets them more. The fusion's
validation score rose from 0.490 to 0.502 (Resources/reading-directions-validation.txt); test-split figures are in
BENCHMARKS.md. Those weights were then fine-tuned for 3000 more steps on slices of all three directions
(``training_directions``, ~30 min on the CPU), so that the coronal and sagittal readings are no longer those of a net
that never saw such slices: the validation AUPRC of the final map rose from 0.697 to 0.750 and the fusion's
validation score from 0.504 to 0.510 (run 5 in that file). Trained so, its three readings are worth about the same:
weighted 0.4 / 0.3 / 0.3 instead of 0.6 / 0.2 / 0.2 (tools/compare_reading_weights.py) the final map's validation AUPRC
rose to 0.762, and 2000 more steps of the same training to 0.769; the fusion's validation score to 0.517 at the same
intensity weights (run 6). The three readings are then averaged by a power mean of exponent 0.5 (``reading_power``:
the weighted mean of the z-scores' square roots, squared), which asks a voxel to look wrong from every side: 0.769 ->
0.775 with the same weights. 3000 further steps of the same training (seed 2, lr 1e-4) did not help: read so, 0.769.

Another site's T1 differs from IXI's in its contrast between CSF, grey and white matter, not only in a global scale,
and the net had only ever seen IXI's: on the 15 healthy scans of another site (MASS) it flagged 52 ml per scan, four
times what it flags on IXI test scans (BENCHMARKS.md). The bundled weights are those weights fine-tuned for 3000 more
steps (seed 3, lr 1e-4) with every training slice raised to a power drawn log-uniformly between 0.7 and 1.4 (``uad
train --gamma-range 0.7 1.4``; the best raw-map validation score came at step 1000, and those weights are kept).
Scored at seed 0: the final map's validation AUPRC 0.775 -> 0.778, the fusion chooser's score of the dae alone 0.374
-> 0.378 and of the fusion at its bundled weights 0.5200 -> 0.5216 (Resources/dae-contrast-validation.txt); on the
test split, MASS 52 -> 42 ml per scan and synthetic AUPRC 0.731 -> 0.737.

``fine_noise_probability`` (off in the bundled weights) draws the noise of some training slices on a grid twice as
fine (blobs of ~4 mm): the size of MS lesions, which the bundled dae barely sees. 1500 steps from the bundled weights
with half the slices so (seed 8), scored on the fusion chooser's validation cases: alone, small stroke shapes' AUPRC
rose 0.025 -> 0.107 but synthetic anomalies' fell 0.679 -> 0.615 and MS-like lesions stayed unseen (0.003 -> 0.005);
fused at the bundled weights the chooser's score fell 0.4232 -> 0.4153 (tools/reproduce_bundled.sh).

``dark_blob_probability`` (off in the bundled weights) darkens small spots of some training slices by 10-40 %, as MS
lesions look on T1. Fine-tuned so from the bundled weights (half the slices for 1500 steps, or all of them for 4000),
the dae alone still hardly sees the MS-like validation lesions (AUPRC 0.0026 -> 0.0029 / 0.0033), and fused at the
bundled weights the chooser's score moved 0.4232 -> 0.4211 / 0.4244, within the noise of the validation subjects
(Resources/ms-like-validation.txt, 6).

``csf_widening_probability`` (off in the bundled weights) widens the CSF spaces of some clean training slices, so that
the ventricles and cisterns of older or atrophic brains read as healthy: most false positives on the MS and MASS scans
are CSF where IXI's young brains have tissue. Two runs from the bundled weights (1000 and 3000 steps) fused a little
better on validation but within the noise of its subjects, and scored lower alone (tools/reproduce_bundled.sh).

Its map is median-filtered (5 mm) before thresholding, as is usual in the field. Scored alone (the weights before the
contrast augmentation) on the fusion chooser's validation cases (tools/choose_fusion_weights.py --grid 1.0 --medians 0 5
9: Resources/dae-median-validation.txt), the filter raises the AUPRC on synthetic anomalies (0.673 unfiltered, 0.701 at
5 mm, 0.709 at 9 mm) but costs Dice on every kind of case, small lesion shapes most (mean over the four kinds 0.374,
0.366, 0.340). The dae alone keeps the field's 5 mm, at which BENCHMARKS.md measures it; the default model, the fusion,
uses its map unfiltered.

The map's scoring was tried again on the bundled weights (validation AUPRC of the final map, 0.778): a structural
(1 - SSIM) term weighing 0.25 or 1.0 instead of 0.5 (0.760, 0.771; none: 0.666), a narrower or wider SSIM window (0.760,
0.754), other power means over the six passes (at most 0.778), and reconstructing from noisy copies of the input
(0.782, within the noise of the validation subjects, for twice the network time). None is kept
(tools/reproduce_bundled.sh).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet

from uad.errors import UserInputError
from uad.models.base import LossOutput
from uad.models.registry import register
from uad.models.slicewise import SliceConfig, SliceModel

CSF_LIKE = 0.35  # normalised intensity (brain 99th percentile = 1) below which a T1 voxel looks like CSF


@dataclass(frozen=True)
class DAEConfig(SliceConfig):
    name: ClassVar[str] = "dae"
    channels: tuple[int, ...] = (32, 64, 128, 256)  # one stride-2 level between entries: 80 x 96 -> 10 x 12
    num_res_units: int = 1
    noise_grid_divisor: int = 8  # noise drawn on an (H / 8) x (W / 8) grid, then upsampled (the paper's 16 of 128)
    noise_std: float = 0.2  # in normalised units (brain 99th percentile = 1), as in the paper
    # Share of training slices that also get a foreign patch (see foreign_patches); 0 = Kascenas et al. as published.
    foreign_patch_probability: float = 0.0
    # Share of training slices whose CSF spaces are widened (see widen_csf_spaces); 0 = off, as in the bundled dae.
    csf_widening_probability: float = 0.0
    # Share of training slices whose noise is drawn on a grid twice as fine (lesions of a few mm, as in MS); 0 = off.
    fine_noise_probability: float = 0.0
    # Share of training slices that also get small, faint dark blobs (see faint_dark_blobs); 0 = off.
    dark_blob_probability: float = 0.0


def chosen_slices(batch: int, probability: float, device: torch.device) -> torch.Tensor:
    """(B, 1, 1, 1): 1 for a random ``probability`` share of a batch's slices, 0 for the others."""
    return (torch.rand(batch, 1, 1, 1, device=device) < probability).float()


def coarse_noise(shape: tuple[int, ...], divisor: int, std: float, generator_device: torch.device) -> torch.Tensor:
    """(B, 1, H, W) Gaussian noise drawn on a grid ``divisor`` times coarser and upsampled bilinearly."""
    batch, channels, height, width = shape
    coarse = torch.randn(batch, channels, max(1, height // divisor), max(1, width // divisor),
                         device=generator_device) * std
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


def training_noise(shape: tuple[int, ...], config: DAEConfig, generator_device: torch.device) -> torch.Tensor:
    """A training batch's coarse noise; in a ``fine_noise_probability`` share of its slices, drawn twice as fine."""
    noise = coarse_noise(shape, config.noise_grid_divisor, config.noise_std, generator_device)
    if config.fine_noise_probability > 0:
        fine = coarse_noise(shape, max(1, config.noise_grid_divisor // 2), config.noise_std, generator_device)
        chosen = chosen_slices(shape[0], config.fine_noise_probability, generator_device)
        noise = noise * (1 - chosen) + fine * chosen
    return noise


def irregular_blobs(shape: tuple[int, ...], generator_device: torch.device,
                    radius_range: tuple[float, float] = (0.02, 0.2)) -> torch.Tensor:
    """(B, 1, H, W) binary masks, one irregular blob per slice, its radius drawn in ``radius_range`` (shares of the
    slice's width; by default 4 to 40 % of the width across).

    A disk of random centre and radius whose edge is pushed in and out by coarse noise: neither the box nor the
    ellipsoid the synthetic protocol paints, and no real lesion shape (those are kept for evaluation).
    """
    batch, _, height, width = shape
    rows = torch.arange(height, device=generator_device).view(1, 1, height, 1)
    cols = torch.arange(width, device=generator_device).view(1, 1, 1, width)
    centre_row = torch.rand(batch, 1, 1, 1, device=generator_device) * height
    centre_col = torch.rand(batch, 1, 1, 1, device=generator_device) * width
    low, high = radius_range
    radius = (low + (high - low) * torch.rand(batch, 1, 1, 1, device=generator_device)) * width
    distance = ((rows - centre_row) ** 2 + (cols - centre_col) ** 2).sqrt() / radius
    wobble = coarse_noise(shape, 8, 0.35, generator_device)
    return (distance + wobble < 1).float()


def foreign_patches(images: torch.Tensor, masks: torch.Tensor, probability: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreign patch interpolation (Tan et al. 2021; the restoration task of DISYRE, Naval Marimont et al. 2024).

    In a ``probability`` share of the slices, an irregular blob is blended, by a random factor, with the same
    place in another slice of the batch (another subject or level): real tissue texture at a wrong place and
    contrast, which the net must restore to this slice. Coarse noise only teaches it smooth intensity changes;
    a lesion also brings edges and texture of its own. Returns (corrupted images, blob masks).
    """
    batch = images.shape[0]
    chosen = chosen_slices(batch, probability, images.device)
    blend = (0.3 + 0.7 * torch.rand(batch, 1, 1, 1, device=images.device)) * chosen
    blobs = irregular_blobs(images.shape, images.device) * masks * blend
    donors = images.roll(1, dims=0)
    return images * (1 - blobs) + donors * blobs, blobs


def faint_dark_blobs(images: torch.Tensor, masks: torch.Tensor, probability: float) -> torch.Tensor:
    """In a ``probability`` share of the slices, three small irregular blobs (about 4 to 13 mm across on the working
    grid) multiplied by a factor between 0.6 and 0.9 over a softened edge, the tissue's texture kept: faint, small
    hypointensities, as multiple sclerosis shows on T1, which the coarse noise is too large and the foreign patches
    too bright to teach."""
    chosen = chosen_slices(images.shape[0], probability, images.device)
    blobs = torch.zeros_like(images)
    for _ in range(3):
        blobs = torch.maximum(blobs, irregular_blobs(images.shape, images.device, radius_range=(0.01, 0.035)))
    blobs = F.avg_pool2d(blobs, 3, stride=1, padding=1) * masks * chosen
    darkening = 0.1 + 0.3 * torch.rand(images.shape[0], 1, 1, 1, device=images.device)
    return images * (1 - darkening * blobs)


def widen_csf_spaces(images: torch.Tensor, masks: torch.Tensor, probability: float) -> torch.Tensor:
    """Atrophy-like training slices: in a ``probability`` share of them, the CSF spaces grow by 1 or 2 pixels (2-4 mm,
    drawn once per batch) inside an irregular blob, filled with the slice's mean CSF intensity.

    Applied to the clean slice, so the net learns wider ventricles and cisterns as healthy. Older or atrophic
    brains (the MS scan, other sites' scans) have CSF where the young IXI brains have tissue, and that is most of the
    default model's false positives there (Resources/false-positive-sites.txt).
    """
    csf = ((images < CSF_LIKE) & (masks > 0)).float()
    grown = csf
    for _ in range(int(torch.randint(1, 3, (1,)))):
        grown = F.max_pool2d(grown, 3, stride=1, padding=1)
    chosen = chosen_slices(images.shape[0], probability, images.device)
    region = grown * (1 - csf) * masks * irregular_blobs(images.shape, images.device) * chosen
    csf_mean = (images * csf).sum((2, 3), keepdim=True) / csf.sum((2, 3), keepdim=True).clamp(min=1)
    return images * (1 - region) + csf_mean * region


@register(DAEConfig)
class DAEModel(SliceModel):
    family = "reconstruction"
    description = ("Denoising U-Net (Kascenas et al.): trained to remove coarse, lesion-sized noise and blended-in "
                   "foreign tissue; returns healthy tissue sharp and replaces what does not look healthy.")

    config: DAEConfig

    def __init__(self, config: DAEConfig):
        for name in ("foreign_patch_probability", "csf_widening_probability", "fine_noise_probability",
                     "dark_blob_probability"):
            if not 0 <= getattr(config, name) <= 1:
                raise UserInputError(f"{name} is a share of training slices, between 0 and 1; got "
                                     f"{getattr(config, name)}")
        super().__init__(config)
        self.network = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=config.channels,
                            strides=(2,) * (len(config.channels) - 1), num_res_units=config.num_res_units)

    def reconstruct(self, images, masks, mask_size_px=None) -> torch.Tensor:
        return self.network(images).clamp(0, None) * masks

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> LossOutput:
        if self.config.csf_widening_probability > 0:  # the target too: wider CSF is what a healthy brain may show
            images = widen_csf_spaces(images, masks, self.config.csf_widening_probability)
        noise = training_noise(images.shape, self.config, images.device)
        corrupted = images
        if self.config.foreign_patch_probability > 0:
            corrupted, _ = foreign_patches(images, masks, self.config.foreign_patch_probability)
        if self.config.dark_blob_probability > 0:
            corrupted = faint_dark_blobs(corrupted, masks, self.config.dark_blob_probability)
        denoised = self.network(corrupted + noise * masks)
        # Mean squared error over brain pixels only: the background is trivially 0 and would dilute the loss.
        mse = ((denoised - images) ** 2 * masks).sum() / masks.sum().clamp(min=1)
        return LossOutput(mse, {"mse": mse.item()})
