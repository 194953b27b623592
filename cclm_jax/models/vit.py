"""Plain ViT image tower with the BEiT-v2 and DINOv2 variants selected by fields, Flax Linen.

One pre-LN block for both (`x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x))`, exact GELU, LayerNorm eps
`eps`), a learned CLS token before the patch tokens, and what differs, by field:

- `rel_pos_bias`: BEiT's per-block relative position bias, a ((2G-1)^2 + 3, heads) table indexed by
  `relative_position_index(G)` (patch<->patch by offset; rows for CLS->patch, patch->CLS and CLS->CLS).
- `pos_grid`: DINOv2's absolute position embedding (1, pos_grid^2 + 1, D), stored at its training grid (e.g.
  37 for 518 px / 14) and resized to this run's grid G = image_res / patch_size in the forward pass with
  PyTorch's bicubic interpolation (align_corners=False, A=-0.75: `bicubic_resize_matrix`), as HF's
  `Dinov2Embeddings.interpolate_pos_encoding` does; the CLS row is kept. 0: none (BEiT).
- `qkv_bias`: 'qv' (BEiT: the fused `qkv` has no bias; separate `q_bias`, `v_bias`, zero for k), 'qkv'
  (DINOv2: a bias on all three) or 'none'.
- `layer_scale_init`: the initial value of the per-channel layer scales `gamma_1`, `gamma_2` (BEiT 0.1,
  DINOv2 1.0); 0 = no layer scale.
- `pool`: 'mean' (BEiT-v2 with mean pooling): the CLS output is dropped, `fc_norm` is applied to every patch
  token and token 0 is the mean of the normalised patch tokens (or, with `patch_weights`, their weighted
  mean: region pooling); 'cls' (DINOv2 `Dinov2Model.last_hidden_state`): the final `norm` over all tokens,
  token 0 = the CLS output.

Image (B, H, W, 3) float NHWC normalised -> (B, 1 + G^2, D): [pooled or CLS token; patch tokens]. Parameter names
follow the timm/BEiT state_dict (`blocks.{i}.attn.qkv` <-> `blocks_{i}/attn/qkv`); `cclm_jax.interop` maps
HF `Dinov2Model` / `BeitModel` names onto them. With `scan_layers` the blocks run as one `lax.scan` over their
parameters stacked on the fly (the parameter tree keeps its `blocks_{i}` entries).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cclm_jax.models.common import DenseGeneral, LayerNorm, attention_softmax, param_with_axes, trunc_normal_init
from cclm_jax.models.swin import Mlp, drop_path, is_zero_rate
from cclm_jax.models.swin import relative_position_index as window_relative_index

QKV_BIASES = ("qv", "qkv", "none")
POOLS = ("mean", "cls")
BICUBIC_A = -0.75  # PyTorch's bicubic coefficient (non-antialiased)


def relative_position_index(grid: int) -> np.ndarray:
    """(G^2+1, G^2+1) int32 index into BEiT's ((2G-1)^2 + 3, heads) table; token 0 is CLS.

    Patch pairs by offset as in Swin ((dy+G-1)*(2G-1) + dx+G-1); row 0 (CLS -> any) = T-3, column 0
    (any -> CLS) = T-2, [0, 0] = T-1, with T = (2G-1)^2 + 3.
    """
    rows = (2 * grid - 1) ** 2 + 3
    n = grid * grid + 1
    index = np.zeros((n, n), np.int32)
    index[1:, 1:] = window_relative_index(grid)
    index[0, :] = rows - 3
    index[:, 0] = rows - 2
    index[0, 0] = rows - 1
    return index


def relative_table_rows(grid: int) -> int:
    """Rows of a BEiT relative position bias table for a G x G patch grid."""
    return (2 * grid - 1) ** 2 + 3


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """(n,) fractional offsets -> (n, 4) PyTorch bicubic weights of the samples at floor-1 .. floor+2."""
    a = BICUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    return np.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)


@functools.lru_cache(maxsize=32)
def bicubic_resize_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) float32 matrix M with `M @ x` = `torch.nn.functional.interpolate(x, size=dst, mode='bicubic',
    align_corners=False)` along one axis (source index scale*(i+0.5)-0.5, taps clamped to the edges).

    Separable: a 2-D resize of P (src, src) is M @ P @ M^T. Equal sizes give the identity.
    """
    scale = src / dst
    real = scale * (np.arange(dst, dtype=np.float64) + 0.5) - 0.5
    base = np.floor(real)
    weights = _cubic_weights(real - base)
    matrix = np.zeros((dst, src), np.float64)
    for k in range(4):
        taps = np.clip(base.astype(np.int64) - 1 + k, 0, src - 1)
        np.add.at(matrix, (np.arange(dst), taps), weights[:, k])
    return matrix.astype(np.float32)


def resize_position_embedding(pos: jax.Array, grid: int) -> jax.Array:
    """(1, S^2+1, D) [CLS; S x S row-major] -> (1, grid^2+1, D) by bicubic resize of the patch rows (float32)."""
    side = int(round((pos.shape[1] - 1) ** 0.5))
    if side == grid:
        return pos
    m = jnp.asarray(bicubic_resize_matrix(side, grid))
    patches = pos[0, 1:].astype(jnp.float32).reshape(side, side, -1)
    resized = jnp.einsum("ys,sxd->yxd", m, jnp.einsum("xt,std->sxd", m, patches))
    return jnp.concatenate([pos[:, :1], resized.reshape(1, grid * grid, -1).astype(pos.dtype)], axis=1)


class Attention(nn.Module):
    """Self-attention over (B, N, D) with a fused qkv kernel (D, 3, heads, hd), optional relative bias."""

    dim: int
    num_heads: int
    qkv_bias: str
    grid: int
    rel_pos_bias: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        head_dim = self.dim // self.num_heads
        qkv = DenseGeneral((3, self.num_heads, head_dim), axes=("embed", None, "heads", None),
                           use_bias=self.qkv_bias == "qkv", dtype=self.dtype,
                           kernel_init=trunc_normal_init(0.02), name="qkv")(x)  # (B, N, 3, nH, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.qkv_bias == "qv":
            bias_shape, bias_axes = (self.num_heads, head_dim), ("heads", None)
            q = q + param_with_axes(self, "q_bias", nn.initializers.zeros, bias_shape, bias_axes).astype(q.dtype)
            v = v + param_with_axes(self, "v_bias", nn.initializers.zeros, bias_shape, bias_axes).astype(v.dtype)
        q = q * (head_dim ** -0.5)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        if self.rel_pos_bias:
            table = param_with_axes(self, "relative_position_bias_table", nn.initializers.zeros,
                                    (relative_table_rows(self.grid), self.num_heads), (None, "heads"))
            index = relative_position_index(self.grid)
            bias = table[index.reshape(-1)].reshape(index.shape + (self.num_heads,))
            scores = scores + bias.transpose(2, 0, 1)[None].astype(jnp.float32)
        probs = attention_softmax(scores).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return DenseGeneral(self.dim, axis=(-2, -1), axes=("heads", None, "embed"), dtype=self.dtype,
                            kernel_init=trunc_normal_init(0.02), name="proj")(out)


class Block(nn.Module):
    """Pre-LN ViT block on (B, N, D) with optional layer scale; `drop_rate` (call) overrides the attribute rate
    with a traced scalar (scanned blocks)."""

    dim: int
    num_heads: int
    mlp_ratio: float
    qkv_bias: str
    grid: int
    rel_pos_bias: bool
    layer_scale_init: float
    eps: float
    drop_path_rate: float = 0.0
    deterministic: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, drop_rate: jax.Array | None = None) -> jax.Array:
        rate = self.drop_path_rate if drop_rate is None else drop_rate
        y = Attention(self.dim, self.num_heads, self.qkv_bias, self.grid, self.rel_pos_bias, self.dtype,
                      name="attn")(LayerNorm(self.eps, name="norm1")(x).astype(self.dtype))
        y = self._scale("gamma_1", y)
        rng = None if self.deterministic or is_zero_rate(rate) else self.make_rng("dropout")
        x = x + drop_path(y, rate, self.deterministic, rng)
        y = Mlp(self.dim, int(self.dim * self.mlp_ratio), self.dtype, name="mlp")(
            LayerNorm(self.eps, name="norm2")(x).astype(self.dtype))
        y = self._scale("gamma_2", y)
        rng = None if self.deterministic or is_zero_rate(rate) else self.make_rng("dropout")
        return x + drop_path(y, rate, self.deterministic, rng)

    def _scale(self, name: str, y: jax.Array) -> jax.Array:
        if not self.layer_scale_init:
            return y
        gamma = param_with_axes(self, name, nn.initializers.constant(self.layer_scale_init), (self.dim,),
                                ("norm",))
        return y * gamma.astype(y.dtype)


class PatchEmbed(nn.Module):
    """(B, H, W, 3) -> (B, (H/p)*(W/p), D): non-overlapping p x p conv with bias (`proj`), no norm."""

    patch_size: int
    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        x = nn.Conv(self.dim, (self.patch_size, self.patch_size), strides=self.patch_size, padding="VALID",
                    dtype=self.dtype,
                    kernel_init=nn.with_logical_partitioning(trunc_normal_init(0.02), (None, None, None, "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), name="proj")(image)
        b, h, w, c = x.shape
        return x.reshape(b, h * w, c)


class VisionTransformer(nn.Module):
    """ViT tower (module docstring). `__call__(image, patch_weights=None)`; `patch_weights` (B, G^2) float:
    with pool='mean', token 0 becomes sum_i(w_i x_i) / sum_i(w_i) over the normalised patch tokens."""

    image_res: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: str = "qv"
    rel_pos_bias: bool = True
    pos_grid: int = 0
    layer_scale_init: float = 0.1
    pool: str = "mean"
    eps: float = 1e-6
    drop_path_rate: float = 0.1
    remat: bool = False
    deterministic: bool = True
    dtype: Any = jnp.float32
    scan_layers: bool = False

    @property
    def grid(self) -> int:
        return self.image_res // self.patch_size

    def _block(self, rate: float, parent: Any = ...) -> Block:
        kwargs = {} if parent is ... else {"parent": parent}
        cls = nn.remat(Block) if self.remat and parent is ... else Block
        return cls(self.width, self.num_heads, self.mlp_ratio, self.qkv_bias, self.grid, self.rel_pos_bias,
                   self.layer_scale_init, self.eps, rate, self.deterministic, self.dtype, **kwargs)

    def setup(self):
        rates = np.linspace(0.0, self.drop_path_rate, self.depth).tolist()
        self.patch_embed = PatchEmbed(self.patch_size, self.width, self.dtype)
        self.cls_token = param_with_axes(self, "cls_token", trunc_normal_init(0.02), (1, 1, self.width),
                                         (None, None, "embed"))
        if self.pos_grid:
            self.pos_embed = param_with_axes(self, "pos_embed", trunc_normal_init(0.02),
                                             (1, self.pos_grid ** 2 + 1, self.width), (None, None, "embed"))
        self.blocks = [self._block(rates[i]) for i in range(self.depth)]
        if self.pool == "mean":
            self.fc_norm = LayerNorm(self.eps)
        else:
            self.norm = LayerNorm(self.eps)

    @property
    def num_features(self) -> int:
        return self.width

    def __call__(self, image: jax.Array, patch_weights: jax.Array | None = None) -> jax.Array:
        x = self.patch_embed(image.astype(self.dtype))
        cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, self.width))
        x = jnp.concatenate([cls, x], axis=1)
        if self.pos_grid:
            x = x + resize_position_embedding(self.pos_embed, self.grid).astype(x.dtype)
        x = self._blocks(x)
        if self.pool == "cls":
            return self.norm(x).astype(self.dtype)
        patches = self.fc_norm(x[:, 1:])  # float32
        if patch_weights is None:
            token = jnp.mean(patches, axis=1, keepdims=True)
        else:
            w = patch_weights.astype(jnp.float32)[..., None]
            token = jnp.sum(patches * w, axis=1, keepdims=True) / jnp.sum(w, axis=1, keepdims=True)
        return jnp.concatenate([token, patches], axis=1).astype(self.dtype)

    def _blocks(self, x: jax.Array) -> jax.Array:
        if not self.scan_layers or self.is_initializing() or self.depth < 2:
            for block in self.blocks:
                x = block(x)
            return x
        stack = lambda trees: jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)  # noqa: E731
        params = stack([block.variables["params"] for block in self.blocks])
        rates = jnp.asarray(np.linspace(0.0, self.drop_path_rate, self.depth), jnp.float32)
        block = self._block(0.0, parent=None)
        keys = None if self.deterministic else jax.random.split(self.make_rng("dropout"), self.depth)

        def body(h, xs):
            p, rate, key = xs
            rngs = None if key is None else {"dropout": key}
            return block.apply({"params": p}, h, rate, rngs=rngs), None

        if self.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, (params, rates, keys))
        return x
