"""Building blocks shared by the vision and text towers: sharded Dense/LayerNorm and initialisers.

Every parameter carries logical axis names (`embed`, `heads`, `mlp`, `vocab`, `norm`, ...), which
`cclm_jax.parallel` maps onto mesh axes. LayerNorm and softmax always run in float32, whatever the compute
dtype, and LayerNorm uses eps 1e-5 (the PyTorch default used by both towers).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Initializer = Callable[..., jax.Array]
LAYER_NORM_EPS = 1e-5
ATTENTION_IMPLS = ("xla", "dot_product")


def trunc_normal_init(std: float) -> Initializer:
    """Normal(0, std) truncated at +-2 std (timm's trunc_normal_ with the default bounds)."""
    return nn.initializers.truncated_normal(stddev=std / 0.87962566103423978, lower=-2.0, upper=2.0)


def param_with_axes(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
                    axes: Sequence[str | None], dtype: Any = jnp.float32) -> jax.Array:
    """Declare a float parameter with logical axis names `axes` (one per dim of `shape`)."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


class DenseGeneral(nn.Module):
    """`nn.DenseGeneral` whose kernel and bias carry logical axes.

    `axes` names every kernel dim: the contracted input dims first, then the output `features` dims;
    the bias takes the output part. Computes in `dtype` with float32 parameters.
    """

    features: int | Sequence[int]
    axes: Sequence[str | None]
    axis: int | Sequence[int] = -1
    use_bias: bool = True
    dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axis = tuple(a % x.ndim for a in axis)
        in_shape = tuple(x.shape[a] for a in axis)
        kernel = param_with_axes(self, "kernel", self.kernel_init, in_shape + features, self.axes)
        contract = (axis, tuple(range(len(axis))))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        if self.use_bias:
            bias = param_with_axes(self, "bias", self.bias_init, features, self.axes[-len(features):])
            y = y + bias.astype(self.dtype)
        return y


class LayerNorm(nn.Module):
    """LayerNorm over the last dim in float32 (params `scale`, `bias`, logical axis `norm`)."""

    eps: float = LAYER_NORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones, (dim,), ("norm",))
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (dim,), ("norm",))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        return (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


def attention_softmax(scores: jax.Array) -> jax.Array:
    """Softmax over the last axis in float32."""
    return jax.nn.softmax(scores.astype(jnp.float32), axis=-1)


def cudnn_attention_supported(q: jax.Array, k: jax.Array) -> bool:
    """Whether cuDNN flash attention takes these (B, L, nH, hd) operands with a bias, in training.

    Needs a CUDA backend, fp16/bf16, head_dim a multiple of 8 and <= 128, and even query/key lengths.
    """
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128 and q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """softmax(q k^T + bias) v through `jax.nn.dot_product_attention`, q already scaled.

    q (B, Lq, nH, hd), k/v (B, Lk, nH, hd), bias float32 broadcastable to (B, nH, Lq, Lk) -> (B, Lq, nH, hd).
    cuDNN flash attention where `cudnn_attention_supported` (its bias must be (B, 1, Lq, Lk)), else the XLA
    implementation (scores and softmax in float32, like the explicit path).
    """
    if cudnn_attention_supported(q, k):
        bias = jnp.broadcast_to(bias, (q.shape[0], 1, q.shape[1], k.shape[1])).astype(q.dtype)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0, implementation="xla")
