"""Swin Transformer image encoder (the CCLM vision tower), Flax Linen.

Semantics follow the official CCLM/Swin code (spec §1.2): patch embedding conv 4x4 + LayerNorm, four
stages of window attention with a relative position bias table ((2W-1)^2, heads), cyclic shift on odd
blocks with an additive -100 mask, no shift (and window = stage resolution) when the stage resolution is
<= the window, PatchMerging in the reference channel order with LayerNorm and a bias-free reduction,
final LayerNorm, and a mean-pooled "CLS" token prepended to the patch tokens. `ape` (off in CCLM; the official
Swin's option) adds a learned absolute position embedding (1, (H/p)^2, C) after the patch embedding.

Images are NHWC float32, already normalised. Parameter names mirror the PyTorch state_dict
(`layers.{s}.blocks.{b}.attn.qkv` <-> `layers_{s}/blocks_{b}/attn/qkv`) so conversion is a name map.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cclm_jax.models.common import (
    DenseGeneral,
    LayerNorm,
    attention_softmax,
    param_with_axes,
    trunc_normal_init,
)

SHIFT_MASK_VALUE = -100.0  # the official Swin mask value (not -inf)


def relative_position_index(window: int) -> np.ndarray:
    """(window^2, window^2) int32 index into the ((2W-1)^2, heads) relative bias table."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))  # (2, W, W)
    flat = coords.reshape(2, -1)
    rel = (flat[:, :, None] - flat[:, None, :]).transpose(1, 2, 0)  # (N, N, 2)
    rel = rel + (window - 1)
    return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).astype(np.int32)


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """(B, H, W, C) -> (B * nW, window*window, C), windows in row-major order (numpy or jax arrays)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: jax.Array, window: int, h: int, w: int) -> jax.Array:
    """(B * nW, window*window, C) -> (B, H, W, C); inverse of `window_partition`."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def shifted_window_mask(resolution: int, window: int, shift: int) -> np.ndarray:
    """(nW, N, N) float32 additive mask (0 or -100) for cyclically shifted windows, N = window^2."""
    region = np.zeros((resolution, resolution), np.float32)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in bounds:
        for ws in bounds:
            region[hs, ws] = label
            label += 1
    windows = window_partition(region[None, :, :, None], window)[..., 0]  # numpy in, numpy out
    diff = windows[:, None, :] - windows[:, :, None]
    return np.where(diff != 0, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def stage_geometry(resolution: int, window: int) -> tuple[int, bool]:
    """(effective window, whether odd blocks shift) for a stage of the given token resolution."""
    if resolution <= window:
        return resolution, False
    return window, True


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    Input (B*nW, N, C) with N = window^2; `mask` (nW, N, N) or None.
    """

    dim: int
    num_heads: int
    window: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
        head_dim = self.dim // self.num_heads
        table = param_with_axes(
            self, "relative_position_bias_table", trunc_normal_init(0.02),
            ((2 * self.window - 1) ** 2, self.num_heads), (None, "heads"))
        qkv = DenseGeneral(
            (3, self.num_heads, head_dim), axes=("embed", None, "heads", None), dtype=self.dtype,
            kernel_init=trunc_normal_init(0.02), name="qkv")(x)  # (B_, N, 3, nH, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = q * (head_dim ** -0.5)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        index = relative_position_index(self.window)
        bias = table[index.reshape(-1)].reshape(index.shape + (self.num_heads,))
        scores = scores + bias.transpose(2, 0, 1)[None].astype(jnp.float32)
        if mask is not None:
            n_windows = mask.shape[0]
            scores = scores.reshape(-1, n_windows, self.num_heads, *scores.shape[-2:])
            scores = scores + jnp.asarray(mask)[None, :, None]
            scores = scores.reshape(-1, self.num_heads, *scores.shape[-2:])
        probs = attention_softmax(scores).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return DenseGeneral(
            self.dim, axis=(-2, -1), axes=("heads", None, "embed"), dtype=self.dtype,
            kernel_init=trunc_normal_init(0.02), name="proj")(out)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 on (..., C)."""

    dim: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = DenseGeneral(self.hidden, axes=("embed", "mlp"), dtype=self.dtype,
                         kernel_init=trunc_normal_init(0.02), name="fc1")(x)
        x = nn.gelu(x, approximate=False)
        return DenseGeneral(self.dim, axes=("mlp", "embed"), dtype=self.dtype,
                            kernel_init=trunc_normal_init(0.02), name="fc2")(x)


def drop_path(x: jax.Array, rate: float | jax.Array, deterministic: bool, rng: jax.Array | None) -> jax.Array:
    """Per-example stochastic depth on (B, ...): zero the branch with prob `rate`, rescale by 1/(1-rate).

    `rate` is a Python float, or a traced float32 scalar (scanned blocks, whose rates differ block by block); the
    result keeps `x`'s dtype either way (a bfloat16 branch stays bfloat16, as a scan carry must)."""
    if deterministic or is_zero_rate(rate):
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    scale = jnp.asarray(1.0 / (1.0 - rate), x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros_like(x))


def is_zero_rate(rate: float | jax.Array) -> bool:
    """True for a Python 0.0 rate (no drop-path randomness needed); a traced rate is never known to be zero."""
    return isinstance(rate, float) and rate == 0.0


class SwinBlock(nn.Module):
    """Pre-LN Swin block on (B, H*W, C): (shifted) window attention and an MLP, each residual.

    `drop_rate` (call argument) overrides the `drop_path_rate` attribute with a traced scalar (scanned blocks).
    """

    dim: int
    resolution: int
    num_heads: int
    window: int
    shift: int
    mlp_ratio: float
    drop_path_rate: float
    deterministic: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, drop_rate: jax.Array | None = None) -> jax.Array:
        rate = self.drop_path_rate if drop_rate is None else drop_rate
        b, _, c = x.shape
        res = self.resolution
        y = LayerNorm(name="norm1")(x).astype(self.dtype).reshape(b, res, res, c)
        if self.shift:
            y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
        mask = shifted_window_mask(res, self.window, self.shift) if self.shift else None
        y = window_partition(y, self.window)
        y = WindowAttention(self.dim, self.num_heads, self.window, self.dtype, name="attn")(y, mask)
        y = window_reverse(y, self.window, res, res)
        if self.shift:
            y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
        y = y.reshape(b, res * res, c)
        rng = None if self.deterministic or is_zero_rate(rate) else self.make_rng("dropout")
        x = x + drop_path(y, rate, self.deterministic, rng)
        y = Mlp(self.dim, int(self.dim * self.mlp_ratio), self.dtype, name="mlp")(
            LayerNorm(name="norm2")(x).astype(self.dtype))
        rng = None if self.deterministic or is_zero_rate(rate) else self.make_rng("dropout")
        return x + drop_path(y, rate, self.deterministic, rng)


class PatchMerging(nn.Module):
    """(B, H*W, C) -> (B, H/2*W/2, 2C): 2x2 neighbours concatenated in the reference order, LN, linear."""

    dim: int
    resolution: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, _, c = x.shape
        x = x.reshape(b, self.resolution, self.resolution, c)
        x = jnp.concatenate(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        x = x.reshape(b, -1, 4 * c)
        x = LayerNorm(name="norm")(x).astype(self.dtype)
        return DenseGeneral(2 * self.dim, axes=("mlp", "embed"), use_bias=False, dtype=self.dtype,
                            kernel_init=trunc_normal_init(0.02), name="reduction")(x)


class SwinStage(nn.Module):
    """Blocks of one stage (even blocks unshifted, odd blocks shifted by window//2), then PatchMerging.

    With `scan_layers`, a stage of >= 4 blocks (an even number) runs as one `lax.scan` over (unshifted, shifted)
    block pairs whose parameters are stacked on the fly; the parameter tree keeps its `blocks_{i}` entries.
    """

    dim: int
    resolution: int
    depth: int
    num_heads: int
    window: int
    mlp_ratio: float
    drop_path_rates: Sequence[float]
    has_downsample: bool
    remat: bool = False
    deterministic: bool = True
    dtype: Any = jnp.float32
    scan_layers: bool = False

    def setup(self):
        window, shifts = stage_geometry(self.resolution, self.window)
        block_cls = nn.remat(SwinBlock) if self.remat else SwinBlock
        self.blocks = [
            block_cls(self.dim, self.resolution, self.num_heads, window,
                      (window // 2) if (shifts and i % 2 == 1) else 0, self.mlp_ratio,
                      self.drop_path_rates[i], self.deterministic, self.dtype)
            for i in range(self.depth)
        ]
        if self.has_downsample:
            self.downsample = PatchMerging(self.dim, self.resolution, self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.scan_layers and not self.is_initializing() and self.depth >= 4 and self.depth % 2 == 0:
            x = self._scanned_pairs(x)
        else:
            for block in self.blocks:
                x = block(x)
        if self.has_downsample:
            x = self.downsample(x)
        return x

    def _scanned_pairs(self, x: jax.Array) -> jax.Array:
        """The blocks as `depth // 2` scan steps of (unshifted, shifted) pairs; (B, H*W, C) -> (B, H*W, C)."""
        window, shifts = stage_geometry(self.resolution, self.window)
        pairs = self.depth // 2
        stack = lambda trees: jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)  # noqa: E731
        even = stack([self.blocks[i].variables["params"] for i in range(0, self.depth, 2)])
        odd = stack([self.blocks[i].variables["params"] for i in range(1, self.depth, 2)])
        rates = jnp.asarray(self.drop_path_rates, jnp.float32).reshape(pairs, 2)

        def block(shift):
            return SwinBlock(self.dim, self.resolution, self.num_heads, window, shift, self.mlp_ratio, 0.0,
                             self.deterministic, self.dtype, parent=None)

        unshifted, shifted = block(0), block(window // 2 if shifts else 0)
        keys = None
        if not self.deterministic:
            keys = jax.random.split(self.make_rng("dropout"), 2 * pairs)
            keys = keys.reshape((pairs, 2) + keys.shape[1:])

        def body(h, xs):
            p_even, p_odd, rate, key = xs
            rngs = (None, None) if key is None else ({"dropout": key[0]}, {"dropout": key[1]})
            h = unshifted.apply({"params": p_even}, h, rate[0], rngs=rngs[0])
            return shifted.apply({"params": p_odd}, h, rate[1], rngs=rngs[1]), None

        if self.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, (even, odd, rates, keys))
        return x


class SwinTransformer(nn.Module):
    """Image (B, H, W, 3) float NHWC -> (B, 1 + (H/32)^2, C_final): [mean-pooled CLS; patch tokens]."""

    image_res: int
    patch_size: int
    embed_dim: int
    depths: Sequence[int]
    num_heads: Sequence[int]
    window_size: int
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    remat: bool = False
    deterministic: bool = True
    dtype: Any = jnp.float32
    scan_layers: bool = False
    ape: bool = False

    def setup(self):
        n_stages = len(self.depths)
        if self.ape:  # the official Swin's optional absolute position embedding (off in CCLM's towers)
            grid = self.image_res // self.patch_size
            self.absolute_pos_embed = param_with_axes(self, "absolute_pos_embed", trunc_normal_init(0.02),
                                                      (1, grid * grid, self.embed_dim), (None, None, "embed"))
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
        self.patch_embed = PatchEmbed(self.patch_size, self.embed_dim, self.dtype)
        layers, start = [], 0
        for s in range(n_stages):
            layers.append(SwinStage(
                dim=self.embed_dim * 2 ** s,
                resolution=self.image_res // self.patch_size // 2 ** s,
                depth=self.depths[s], num_heads=self.num_heads[s], window=self.window_size,
                mlp_ratio=self.mlp_ratio, drop_path_rates=tuple(rates[start:start + self.depths[s]]),
                has_downsample=s < n_stages - 1, remat=self.remat, deterministic=self.deterministic,
                dtype=self.dtype, scan_layers=self.scan_layers))
            start += self.depths[s]
        self.layers = layers
        self.norm = LayerNorm()

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    def __call__(self, image: jax.Array) -> jax.Array:
        x = self.patch_embed(image.astype(self.dtype))
        if self.ape:
            x = x + self.absolute_pos_embed.astype(self.dtype)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        cls = jnp.mean(x, axis=1, keepdims=True)
        return jnp.concatenate([cls, x], axis=1).astype(self.dtype)


class PatchEmbed(nn.Module):
    """(B, H, W, 3) -> (B, (H/p)*(W/p), C): non-overlapping p x p conv, then LayerNorm (named `norm`)."""

    patch_size: int
    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        conv = nn.Conv(
            self.embed_dim, (self.patch_size, self.patch_size), strides=self.patch_size,
            padding="VALID", dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="proj")
        x = conv(image)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        return LayerNorm(name="norm")(x).astype(self.dtype)

