"""Ano-swinMAE (Rashmi et al. 2024): a Swin-transformer masked autoencoder and its sliding-mask inference.

Training masks square regions of the slice (16 or 32 px at 2 mm, i.e. the paper's 32 and 64 px masks at 1 mm)
laid on a tile grid with a random offset; masked 4 px patches become a learned mask token that keeps its
absolute position embedding, and the loss is the squared error inside the masked brain.

Inference tiles the slice with non-overlapping masks of the chosen size. Pass ``p`` of four masks every tile
whose (row, column) parity is ``p``: no two masked tiles touch, so each keeps its full neighbourhood as context,
and over the four passes every pixel is masked exactly once. The reconstruction of a pixel is taken from the
pass that masked it, so the residual "accumulated over passes" is a plain residual of that composite. The paper
min-max normalises each pass's residual; here the healthy voxel-wise statistics of ``SliceModel`` normalise the
map instead, which keeps slices and scans comparable. Four passes per slice instead of one per mask position.

``mask_mode="iterative"`` (after IterMask3D, Liang et al. 2025) spends the same four passes differently: two
passes mask the tiles in a checkerboard (each tile once, its four edge neighbours visible), then each refinement
pass masks again only the 4 px patches whose reconstruction error is still among the highest and unmasks the rest,
so the original, healthy-looking context around a suspicious region guides its inpainting. Every pixel keeps the
reconstruction of the last pass that masked it.

Network: patch 4 -> 24 x 24 tokens (dim 64), two Swin stages (window 6, shifted every second block) with
patch merging to 12 x 12 (dim 128), and a mirrored decoder with patch expansion; 0.9 M parameters, chosen so a
training step of 32 slices takes ~0.4 s on two CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from uad.models.base import LossOutput
from uad.models.registry import register
from uad.models.slicewise import SliceConfig, SliceModel
from uad.options import MASK_MODES

PASSES = 4  # tile parities (row % 2, column % 2)
CHECKERBOARD = ((0, 3), (1, 2))  # iterative mode's first two passes: tile parities masked together
# Iterative mode's refinement passes: each masks this fraction of the slice's brain patches, those with the highest
# error among the patches the previous pass masked (so the masked region only shrinks).
REFINE_FRACTIONS = (0.25, 0.1)


@dataclass(frozen=True)
class SwinMAEConfig(SliceConfig):
    name: ClassVar[str] = "swin-mae"
    padded_size: int = 96  # slices are zero-padded to a square that every mask size and window tiles
    patch_size: int = 4
    dim: int = 64
    depths: tuple[int, ...] = (2, 2)  # blocks per stage; each stage after the first halves the token grid
    heads: tuple[int, ...] = (4, 8)
    window: int = 6  # tokens per window side
    train_mask_sizes_px: tuple[int, ...] = (16, 32)  # 32 and 64 mm on the 2 mm grid
    default_mask_size_px: int = 32


def mask_pattern(height: int, width: int, tile: int, pass_index: int, offset: tuple[int, int] = (0, 0),
                 device: torch.device | None = None) -> torch.Tensor:
    """(H, W) bool: tiles of side ``tile`` (grid shifted by ``offset``) whose row/column parity is ``pass_index``."""
    rows = (torch.arange(height, device=device) + offset[0]) // tile
    cols = (torch.arange(width, device=device) + offset[1]) // tile
    row_parity, col_parity = divmod(pass_index, 2)
    return ((rows % 2 == row_parity)[:, None]) & ((cols % 2 == col_parity)[None, :])


def _windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, window * window, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _unwindows(x: torch.Tensor, window: int, b: int, h: int, w: int) -> torch.Tensor:
    x = x.view(b, h // window, w // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, -1)


class SwinBlock(nn.Module):
    """Window self-attention + MLP; with ``shift`` the windows are rolled by half a window (Liu et al. 2021)."""

    def __init__(self, dim: int, heads: int, window: int, shift: bool):
        super().__init__()
        self.window, self.shift, self.heads = window, window // 2 if shift else 0, heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _shift_mask(self, h: int, w: int, device) -> torch.Tensor:
        """Additive mask so a rolled window never attends across the seam it wrapped around."""
        regions = torch.zeros(h, w, device=device)
        cuts = (slice(0, -self.window), slice(-self.window, -self.shift), slice(-self.shift, None))
        label = 0
        for rows in cuts:
            for cols in cuts:
                regions[rows, cols] = label
                label += 1
        ids = _windows(regions[None, :, :, None], self.window)[..., 0]
        different = ids[:, :, None] != ids[:, None, :]
        return torch.zeros(different.shape, device=device).masked_fill(different, float("-inf"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
        windows = _windows(y, self.window)
        n = windows.shape[1]
        q, k, v = self.qkv(windows).view(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None
        if self.shift:  # (windows, n, n), repeated over the batch
            attn_mask = self._shift_mask(h, w, x.device).repeat(b, 1, 1)[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        y = self.proj(y.transpose(1, 2).reshape(-1, n, c))
        y = _unwindows(y, self.window, b, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class SwinMAENetwork(nn.Module):
    """Masked image in, full image out; masked patches enter as a learned token at their own position."""

    def __init__(self, config: SwinMAEConfig):
        super().__init__()
        p, dim, grid = config.patch_size, config.dim, config.padded_size // config.patch_size
        self.patch_size = p
        self.embed = nn.Conv2d(1, dim, p, stride=p)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.position = nn.Parameter(torch.randn(1, grid, grid, dim) * 0.02)
        dims = [dim * 2**i for i in range(len(config.depths))]

        def stage(d: int, depth: int, heads: int) -> nn.Sequential:
            return nn.Sequential(*[SwinBlock(d, heads, config.window, shift=i % 2 == 1) for i in range(depth)])

        self.encoder = nn.ModuleList(stage(d, n, h) for d, n, h in zip(dims, config.depths, config.heads))
        self.merge = nn.ModuleList(nn.Linear(4 * d, 2 * d) for d in dims[:-1])
        self.expand = nn.ModuleList(nn.Linear(2 * d, 4 * d) for d in reversed(dims[:-1]))
        decoder_stages = zip(reversed(dims[:-1]), reversed(config.depths[:-1]), reversed(config.heads[:-1]))
        self.decoder = nn.ModuleList(stage(d, n, h) for d, n, h in decoder_stages)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, p * p)

    def forward(self, images: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        """images (B, 1, S, S), pixel_mask (B, 1, S, S) bool aligned to patches -> (B, 1, S, S)."""
        p = self.patch_size
        tokens = self.embed(images * ~pixel_mask).permute(0, 2, 3, 1)  # (B, g, g, dim)
        token_mask = F.max_pool2d(pixel_mask.float(), p).permute(0, 2, 3, 1) > 0
        x = torch.where(token_mask, self.mask_token, tokens) + self.position
        for index, blocks in enumerate(self.encoder):
            if index:
                x = _merge(x, self.merge[index - 1])
            x = blocks(x)
        for expand, blocks in zip(self.expand, self.decoder):
            x = blocks(_expand(x, expand))
        patches = self.head(self.norm(x))  # (B, g, g, p*p)
        b, g = patches.shape[0], patches.shape[1]
        return patches.view(b, g, g, p, p).permute(0, 1, 3, 2, 4).reshape(b, 1, g * p, g * p)


def _highest(error: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, 1, g, g) bool: per slice, the ``counts[b]`` candidate patches of highest ``error``."""
    ranked = error.masked_fill(~candidates, float("-inf")).flatten(1).argsort(dim=1, descending=True)
    chosen = torch.arange(ranked.shape[1], device=error.device)[None, :] < counts[:, None]
    selected = torch.zeros_like(chosen).scatter(1, ranked, chosen)
    return selected.view_as(candidates) & candidates


def _merge(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """Patch merging: each 2 x 2 group of tokens -> one token of twice the width."""
    b, h, w, c = x.shape
    x = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)
    return linear(x)


def _expand(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """Patch expansion: each token -> a 2 x 2 group of tokens of half the width."""
    b, h, w, _ = x.shape
    x = linear(x)
    c = x.shape[-1] // 4
    return x.view(b, h, w, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c)


@register(SwinMAEConfig)
class SwinMAEModel(SliceModel):
    family = "masking"
    uses_mask_size = True
    mask_modes = MASK_MODES
    description = "Ano-swinMAE (Rashmi et al.): a Swin masked autoencoder; a sliding mask inpaints every brain region."

    config: SwinMAEConfig

    def __init__(self, config: SwinMAEConfig):
        super().__init__(config)
        self.network = SwinMAENetwork(config)

    def _pad(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = images.shape[-2:]
        size = self.config.padded_size
        if h > size or w > size:
            raise ValueError(f"slice {h}x{w} is larger than the model's {size}x{size} input")
        top, left = (size - h) // 2, (size - w) // 2
        return F.pad(images, (left, size - w - left, top, size - h - top)), (top, left)

    def masked_passes(self, images: torch.Tensor, masks: torch.Tensor, mask_size_px: int | None) -> torch.Tensor:
        """Composite reconstruction: every pixel from the one pass (of four) that masked it."""
        tile = mask_size_px or self.config.default_mask_size_px
        padded, (top, left) = self._pad(images)
        brain, _ = self._pad(masks)
        size = self.config.padded_size
        composite = torch.zeros_like(padded)
        for pass_index in range(PASSES):
            pattern = mask_pattern(size, size, tile, pass_index, device=images.device)
            if not (brain[:, 0] * pattern).any():
                continue  # no brain under this pass's masks: nothing to inpaint
            pixel_mask = pattern.expand_as(padded)
            composite = torch.where(pixel_mask, self.network(padded, pixel_mask), composite)
        h, w = images.shape[-2:]
        return composite[..., top:top + h, left:left + w]

    def iterative_passes(self, images: torch.Tensor, masks: torch.Tensor, mask_size_px: int | None) -> torch.Tensor:
        """Composite reconstruction of iterative mask refinement: 2 checkerboard passes + ``REFINE_FRACTIONS``."""
        tile = mask_size_px or self.config.default_mask_size_px
        padded, (top, left) = self._pad(images)
        brain, _ = self._pad(masks)
        size, p = self.config.padded_size, self.config.patch_size
        composite = torch.zeros_like(padded)
        for parities in CHECKERBOARD:
            pattern = mask_pattern(size, size, tile, parities[0], device=images.device) | \
                mask_pattern(size, size, tile, parities[1], device=images.device)
            pixel_mask = pattern.expand_as(padded)
            composite = torch.where(pixel_mask, self.network(padded, pixel_mask), composite)
        brain_patches = F.max_pool2d(brain, p) > 0  # (B, 1, g, g)
        masked = brain_patches
        for fraction in REFINE_FRACTIONS:
            error = F.avg_pool2d((composite - padded).abs() * brain, p)
            masked = masked & _highest(error, masked, (brain_patches.flatten(1).sum(1) * fraction).long())
            if not masked.any():
                break
            pixel_mask = masked.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
            composite = torch.where(pixel_mask, self.network(padded, pixel_mask), composite)
        h, w = images.shape[-2:]
        return composite[..., top:top + h, left:left + w]

    def predict(self, image, brain_mask, mask_size_px=None, batch_size=16, progress=None, mask_mode="sliding"):
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mask_mode!r}")
        # The slice loop of SliceModel calls ``reconstruct`` without a mode: it reads this for one predict call.
        self._mask_mode = mask_mode
        try:
            return super().predict(image, brain_mask, mask_size_px, batch_size, progress)
        finally:
            self._mask_mode = "sliding"

    def reconstruct(self, images, masks, mask_size_px=None) -> torch.Tensor:
        passes = self.iterative_passes if getattr(self, "_mask_mode", "sliding") == "iterative" else self.masked_passes
        return passes(images, masks, mask_size_px).clamp(0, None) * masks

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> LossOutput:
        padded, _ = self._pad(images)
        brain, _ = self._pad(masks)
        size, device = self.config.padded_size, images.device
        choices = self.config.train_mask_sizes_px
        pixel_masks = []
        for _ in range(len(images)):  # a random mask size, grid offset and pass for every slice
            tile = choices[int(torch.randint(len(choices), ()))]
            step = self.config.patch_size
            offset = tuple(int(torch.randint(tile // step, ())) * step for _ in range(2))
            pixel_masks.append(mask_pattern(size, size, tile, int(torch.randint(PASSES, ())), offset, device))
        pixel_mask = torch.stack(pixel_masks)[:, None]
        reconstruction = self.network(padded, pixel_mask)
        weight = pixel_mask * brain
        mse = ((reconstruction - padded) ** 2 * weight).sum() / weight.sum().clamp(min=1)
        return LossOutput(mse, {"masked_mse": mse.item()})
