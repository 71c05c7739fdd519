"""Ano-swinMAE's sliding mask: full coverage, no leakage of a masked region into its own reconstruction."""

import numpy as np
import pytest
import torch

from uad.models.swin_mae import PASSES, REFINE_FRACTIONS, SwinMAEConfig, SwinMAEModel, mask_pattern

from .synthetic_brain import healthy_like


@pytest.mark.parametrize("tile", [16, 32])
@pytest.mark.parametrize("offset", [(0, 0), (4, 12)])
def test_every_pixel_is_masked_exactly_once_per_pass_set(tile, offset):
    passes = torch.stack([mask_pattern(96, 96, tile, p, offset) for p in range(PASSES)])
    assert torch.equal(passes.sum(dim=0), torch.ones(96, 96, dtype=torch.long))
    if offset == (0, 0):  # masked tiles never share an edge, so each keeps its neighbours as context
        for tiles in passes[:, ::tile, ::tile]:
            assert not (tiles[1:] & tiles[:-1]).any() and not (tiles[:, 1:] & tiles[:, :-1]).any()

def test_a_masked_region_never_sees_its_own_pixels():
    """Change the input inside one 32 px tile: that tile's reconstruction must not move (it was masked)."""
    torch.manual_seed(0)
    model = SwinMAEModel(SwinMAEConfig()).eval()
    image = torch.rand(1, 1, 80, 96)
    brain = torch.ones_like(image)
    changed = image.clone()
    changed[..., 24:40, 40:56] = 1.0  # inside the tile covering padded rows 32-63, columns 32-63
    with torch.inference_mode():
        before = model.masked_passes(image, brain, 32)
        after = model.masked_passes(changed, brain, 32)
    assert torch.equal(before[..., 24:40, 40:56], after[..., 24:40, 40:56])
    assert not torch.equal(before, after)  # ... while other tiles, which saw it as context, may change


def test_the_mask_size_changes_the_map():
    torch.manual_seed(0)
    model = SwinMAEModel(SwinMAEConfig()).eval()
    image, mask = healthy_like()
    small, large = model.predict(image, mask, mask_size_px=16), model.predict(image, mask, mask_size_px=32)
    assert small.anomaly_map.shape == large.anomaly_map.shape
    assert not np.allclose(small.anomaly_map, large.anomaly_map)


def test_training_masks_only_brain_pixels_count():
    torch.manual_seed(0)
    model = SwinMAEModel(SwinMAEConfig())
    images = torch.rand(2, 1, 80, 96)
    no_brain = torch.zeros_like(images)
    assert model.loss(images * 0, no_brain).total.item() == 0.0


class _RecordingNetwork(torch.nn.Module):
    """Stands in for the Swin network: remembers each pass's mask and answers with the pass number everywhere."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def forward(self, images, pixel_mask):
        self.masks.append(pixel_mask.clone())
        return torch.full_like(images, float(len(self.masks)))


def test_iterative_mask_reconstructs_every_pixel_in_four_passes_and_only_shrinks():
    torch.manual_seed(0)
    model = SwinMAEModel(SwinMAEConfig()).eval()
    model.network = _RecordingNetwork()
    images = torch.rand(2, 1, 80, 96)
    brain = torch.zeros_like(images)
    brain[..., 10:70, 12:84] = 1
    with torch.inference_mode():
        composite = model.iterative_passes(images, brain, 32)
    masks = [m[..., 8:88, :] for m in model.network.masks]  # the padded slice's rows back to the 80 x 96 slice
    assert len(masks) == PASSES  # the same number of network passes as the sliding mask
    assert torch.equal(masks[0] | masks[1], torch.ones_like(masks[0])) and not (masks[0] & masks[1]).any()
    # every pixel holds the reconstruction of the last pass that masked it, never the input
    last = torch.zeros_like(images)
    for number, mask in enumerate(masks, start=1):
        last = torch.where(mask, float(number), last)
    assert torch.equal(composite, last) and (composite > 0).all()
    # refinement passes mask brain patches only, the chosen fraction of them, and the masked region only shrinks
    brain_patches = torch.nn.functional.max_pool2d(torch.nn.functional.pad(brain, (0, 0, 8, 8)), 4) > 0
    padded_masks = [m[:, :, ::4, ::4] for m in model.network.masks]  # refinement masks are whole 4 px patches
    for fraction, mask, previous in zip(REFINE_FRACTIONS, padded_masks[2:], [brain_patches, *padded_masks[2:]]):
        assert not (mask & ~previous).any()
        assert torch.equal(mask.sum(dim=(1, 2, 3)), (brain_patches.sum(dim=(1, 2, 3)) * fraction).long())


def test_iterative_refinement_re_masks_where_the_reconstruction_differs():
    """A bright square the network cannot inpaint: the last refinement pass still masks all of it."""
    torch.manual_seed(0)
    model = SwinMAEModel(SwinMAEConfig()).eval()
    model.network = _RecordingNetwork()
    images = torch.zeros(1, 1, 80, 96)
    images[..., 32:48, 40:56] = 50.0  # far from any pass number the recording network answers
    brain = torch.ones_like(images)
    with torch.inference_mode():
        model.iterative_passes(images, brain, 32)
    refined = model.network.masks[-1][..., 8:88, :]
    assert refined[..., 32:48, 40:56].all()


def test_the_iterative_mask_mode_changes_the_map():
    torch.manual_seed(0)
    model = SwinMAEModel(SwinMAEConfig()).eval()
    image, mask = healthy_like()
    sliding = model.predict(image, mask, mask_size_px=32)
    iterative = model.predict(image, mask, mask_size_px=32, mask_mode="iterative")
    assert np.isfinite(iterative.anomaly_map).all()
    assert not np.allclose(sliding.anomaly_map, iterative.anomaly_map)
    assert np.allclose(model.predict(image, mask, mask_size_px=32).anomaly_map, sliding.anomaly_map)  # reset
