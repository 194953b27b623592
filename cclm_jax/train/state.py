"""The training state pytree: everything a step reads and writes, and what a checkpoint stores."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """step: optimizer updates applied (int32); params; opt_state; rng: the run's base PRNG key;
    nonfinite: updates skipped because the loss or gradient was NaN/Inf (int32)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite: jax.Array


def create_train_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A fresh state (jit-able; optimizer moments inherit the parameters' shardings)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=rng, nonfinite=jnp.zeros((), jnp.int32))


def global_norm(tree: Any) -> jax.Array:
    """L2 norm over every leaf of a pytree, in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
