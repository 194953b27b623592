"""Swin Transformer image encoder of CCLM (eval mode: no dropout, no drop-path).

Submodule and buffer names follow the official ``vision_encoder.*`` state_dict keys. Images are NCHW
float tensors, already normalised; the output is ``[mean of the final tokens; final tokens]``,
shape (B, 1 + (image_res / (patch_size * 2^(stages-1)))², width).
"""
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cclm_jax.torch.config import swin_stages

SHIFT_MASK_VALUE = -100.0  # added to scores of token pairs that the cyclic shift made neighbours
LAYER_NORM_EPS = 1e-5


def relative_position_index(window: int) -> torch.Tensor:
    """(window², window²) int64: for query token i and key token j of a window (row-major), the row of the
    relative-position bias table that holds the bias of their offset (dy, dx), i.e.
    ``(dy + window - 1) * (2 * window - 1) + dx + window - 1``."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    dy = rows[:, None] - rows[None, :] + window - 1
    dx = cols[:, None] - cols[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def shifted_window_mask(resolution: int, window: int, shift: int) -> torch.Tensor:
    """(num_windows, window², window²) float32 additive mask for a block whose input was rolled by
    ``-shift`` along both axes: 0 for two tokens of the same source region, ``SHIFT_MASK_VALUE`` for two
    tokens that only became neighbours through the wrap-around. Windows are numbered row-major."""
    position = torch.arange(resolution)
    # per axis: 0 = never wrapped, 1 = last window's unwrapped part, 2 = wrapped-around part
    band = (position >= resolution - window).long() + (position >= resolution - shift).long()
    region = (band[:, None] * 3 + band[None, :])[None, :, :, None]
    region = to_windows(region, window)[..., 0]  # (num_windows, window²)
    different = region[:, :, None] != region[:, None, :]
    return torch.where(different, SHIFT_MASK_VALUE, 0.0).to(torch.float32)


def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * num_windows, window², C), windows row-major within each image."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def from_windows(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of ``to_windows``: (B * num_windows, window², C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, height // window, width // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, height, width, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned bias per relative offset and head."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)  # output rows [q; k; v], head-major within each
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B * num_windows, N, C); mask (num_windows, N, N) additive or None -> (B * num_windows, N, C)."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        scores = (q * self.scale) @ k.transpose(-2, -1)  # (bw, heads, n, n)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        scores = scores + bias.reshape(n, n, self.num_heads).permute(2, 0, 1)
        if mask is not None:
            num_windows = mask.shape[0]
            scores = scores.reshape(bw // num_windows, num_windows, self.num_heads, n, n) + mask[None, :, None]
            scores = scores.reshape(bw, self.num_heads, n, n)
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-LN block: x + W-MSA(norm1(x)) with an optional cyclic shift, then x + MLP(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, resolution: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.resolution, self.window, self.shift = resolution, window, shift
        mask = shifted_window_mask(resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask)  # None (absent from the state_dict) when not shifted
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, resolution², C) -> same shape."""
        b, _, c = x.shape
        side = self.resolution
        y = self.norm1(x).reshape(b, side, side, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = from_windows(self.attn(to_windows(y, self.window), self.attn_mask), self.window, side, side)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, side * side, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: concat channels in the order (0,0), (1,0), (0,1), (1,1) (row, col)
    -> LayerNorm(4C) -> Linear(4C -> 2C, no bias)."""

    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, R², C) -> (B, (R/2)², 2C)."""
        b, _, c = x.shape
        x = x.reshape(b, self.resolution, self.resolution, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """``depths[s]`` blocks (odd ones shifted) followed by patch merging on all stages but the last."""

    def __init__(self, dim: int, depth: int, num_heads: int, stage: Mapping, mlp_ratio: float, merge: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, stage["resolution"], stage["window"], stage["shift"] if i % 2 else 0, mlp_ratio)
            for i in range(depth))
        self.downsample = PatchMerging(dim, stage["resolution"]) if merge else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    """Conv2d(3 -> C, kernel = stride = patch) -> flatten row-major -> LayerNorm."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, H, W) -> (B, (H/patch)*(W/patch), C)."""
        return self.norm(self.proj(image).flatten(2).transpose(1, 2))


class SwinTransformer(nn.Module):
    """The CCLM image encoder; ``vision`` is the validated ``config['vision']`` section."""

    def __init__(self, vision: Mapping):
        super().__init__()
        self.image_res = vision["image_res"]
        self.patch_embed = PatchEmbed(vision["patch_size"], vision["embed_dim"])
        stages = swin_stages(vision)
        self.layers = nn.ModuleList(
            SwinStage(vision["embed_dim"] * 2 ** s, depth, heads, stages[s], vision["mlp_ratio"],
                      merge=s < len(stages) - 1)
            for s, (depth, heads) in enumerate(zip(vision["depths"], vision["num_heads"])))
        self.width = vision["embed_dim"] * 2 ** (len(stages) - 1)
        self.norm = nn.LayerNorm(self.width, eps=LAYER_NORM_EPS)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, image_res, image_res) normalised float -> (B, 1 + tokens, width); token 0 is the mean."""
        if image.ndim != 4 or tuple(image.shape[1:]) != (3, self.image_res, self.image_res):
            raise ValueError(f"image: expected shape (B, 3, {self.image_res}, {self.image_res}) (NCHW), "
                             f"got {tuple(image.shape)}")
        x = self.patch_embed(image)
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
