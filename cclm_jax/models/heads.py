"""Projection, matching/box MLP heads and the MLM head (decoder tied to the word embeddings).

PyTorch counterparts (spec §1.3-1.4): `text_proj`/`vision_proj` = Linear(D -> embed_dim);
`build_mlp(d, o)` = Linear(d, 2d) -> LayerNorm(2d) -> GELU -> Linear(2d, o) (torch keys `.0`, `.1`, `.3`,
here `fc1`, `norm`, `fc2`); `cls.predictions` = transform (dense -> GELU -> LayerNorm) + tied decoder + bias.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cclm_jax.models.common import DenseGeneral, LayerNorm, param_with_axes
from cclm_jax.models.text import bert_init


def torch_linear_kernel_init():
    """PyTorch nn.Linear default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int):
    """PyTorch nn.Linear default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_linear(features: int, in_features: int, axes: tuple, dtype: Any, name: str) -> DenseGeneral:
    """A DenseGeneral initialised like a default PyTorch nn.Linear."""
    return DenseGeneral(features, axes=axes, dtype=dtype, kernel_init=torch_linear_kernel_init(),
                        bias_init=torch_linear_bias_init(in_features), name=name)


class MLPHead(nn.Module):
    """(..., D) -> (..., out): Linear(D, 2D) -> LayerNorm -> exact GELU -> Linear(2D, out)."""

    out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x = torch_linear(2 * d, d, ("embed", "mlp"), self.dtype, "fc1")(x)
        x = nn.gelu(LayerNorm(name="norm")(x), approximate=False).astype(self.dtype)
        return torch_linear(self.out, 2 * d, ("mlp", None), self.dtype, "fc2")(x).astype(jnp.float32)


class MLMTransform(nn.Module):
    """(..., D) -> (..., D): dense -> exact GELU -> LayerNorm (torch `cls.predictions.transform`)."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x = DenseGeneral(d, axes=("embed", "mlp"), dtype=self.dtype, kernel_init=bert_init(),
                         name="dense")(x)
        x = nn.gelu(x, approximate=False)
        return LayerNorm(self.eps, name="LayerNorm")(x).astype(self.dtype)


class MLMHead(nn.Module):
    """Transform + decoder bias (V,); the decoder weight is the word embedding matrix (tied, CCLM) or, with
    `tied=False` (X2-VLM), its own `decoder` (V, `hidden`) used by `decode`."""

    vocab_size: int
    eps: float
    dtype: Any = jnp.float32
    tied: bool = True
    hidden: int = 0

    def setup(self):
        self.transform = MLMTransform(self.eps, self.dtype)
        self.bias = param_with_axes(self, "bias", nn.initializers.zeros, (self.vocab_size,), ("vocab",))
        if not self.tied:
            self.decoder = param_with_axes(self, "decoder", bert_init(), (self.vocab_size, self.hidden),
                                           ("vocab", "embed"))

    def decode(self, hidden: jax.Array) -> jax.Array:
        """Untied decoder: (..., D) transformed states -> (..., V) float32 logits (+ bias)."""
        logits = jnp.einsum("...d,vd->...v", hidden, self.decoder.astype(hidden.dtype))
        return (logits + self.bias.astype(hidden.dtype)).astype(jnp.float32)
