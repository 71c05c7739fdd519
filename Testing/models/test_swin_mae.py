"""Ano-swinMAE's sliding mask: full coverage, no leakage of a masked region into its own reconstruction."""

import numpy as np
import pytest
import torch

from uad.models.swin_mae import PASSES, SwinMAEConfig, SwinMAEModel, mask_pattern

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
