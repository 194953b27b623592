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
    nonfinite: updates skipped because the loss, gradient or new parameters were NaN/Inf (int32, cumulative);
    skips: such updates in a row, up to and including the last one (int32; 0 after an applied update)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite: jax.Array
    skips: jax.Array


def create_train_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A fresh state (jit it with `out_shardings=parallel.state_shardings(...)` to place the moments)."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=optimizer.init(params), rng=rng, nonfinite=zero,
                      skips=zero)


def global_norm(tree: Any) -> jax.Array:
    """L2 norm over every leaf of a pytree, in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def all_finite(tree: Any) -> jax.Array:
    """True iff every element of every leaf is finite (bool scalar)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
