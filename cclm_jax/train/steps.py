"""Jitted update steps: one per batch kind (`image_caption`, `parallel_text`, `region`) or one `joint` update.

Each step takes and donates the sharded `TrainState` and returns it with a dict of device scalars (every
loss, the weighted total, gradient and parameter norms, learning rate, temperature, and whether the update
was skipped as non-finite). Nothing inside a step talks to the host.

Reference semantics (spec §2.5, §4.1): the temperature is clamped into [0.001, 0.5] *in the parameter* before
every forward; the learning-rate schedule advances once per mixture cycle, which the optimizer counts itself
(`optimizer.make_optimizer(..., updates_per_schedule_step)`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from cclm_jax import objectives
from cclm_jax.data.mixture import Mixture
from cclm_jax.data.normalize import prepare_batch
from cclm_jax.models.cclm import TEMP_MAX, TEMP_MIN, build_model
from cclm_jax.optimizer import learning_rate, state_after_skip
from cclm_jax.train_state import TrainState, all_finite, global_norm

KINDS = ("image_caption", "parallel_text")  # the 3M mixture; `region` joins for the 4M setting
VIEW_LOSSES = {"image_caption": objectives.image_text_losses, "parallel_text": objectives.parallel_text_losses,
               "region": objectives.region_losses}


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What a step needs to know besides the state and the batch."""

    model_config: ml_collections.ConfigDict
    objectives_config: ml_collections.ConfigDict
    mesh: Mesh | None = None
    dropout: bool = True


def clamp_temperature(params):
    """Write the clamp into the parameter, as the reference's in-place `temp.clamp_` does."""
    return {**params, "temp": jnp.clip(params["temp"], TEMP_MIN, TEMP_MAX)}


def view_loss_fn(cfg: StepConfig, kinds: tuple[str, ...]) -> Callable:

    model = build_model(cfg.model_config, deterministic=not cfg.dropout)

    def loss_fn(params, batches, rng):
        total, measurements = 0.0, {}
        for i, kind in enumerate(kinds):
            losses = VIEW_LOSSES[kind](model, params, prepare_batch(batches[kind]), jax.random.fold_in(rng, i),
                                       config=cfg.objectives_config, mesh=cfg.mesh, dropout=cfg.dropout)
            total = total + objectives.weighted_total(losses, cfg.objectives_config, cfg.mesh)
            prefix = "" if len(kinds) == 1 else f"{kind}/"
            measurements.update({f"{prefix}{k}": v for k, v in losses.items() if k != "negatives"})
        return total, measurements

    return loss_fn


def make_update_fn(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                   prepare_params: Callable | None = None) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """The one (un-jitted) update of every run: `update(state, batches) -> (state, metrics)`.

    `loss_fn(params, batches, rng) -> (total, measurements)`; `prepare_params` maps the parameters before the
    forward and is kept in them (pre-training's temperature clamp). The update is skipped (parameters and Adam's
    state kept; the schedule advances, `optimizer.state_after_skip`; `nonfinite` and `skips` counted) when
    the loss, the gradient norm or any new parameter is not finite. Metrics: the measurements, `loss`,
    `grad_norm`, `param_norm`, `lr` (the learning rate of this update, when the optimizer holds one:
    `optimizer.learning_rate`), `skipped_nonfinite` (device scalars; nothing here talks to the host).
    """
    prepare_params = prepare_params or (lambda params: params)

    def update(state: TrainState, batches) -> tuple[TrainState, dict]:
        params = prepare_params(state.params)
        rng = jax.random.fold_in(state.rng, state.step)
        (total, measurements), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batches, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm) & all_finite(new_params)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        skipped = (~finite).astype(jnp.int32)
        state = state.replace(step=state.step + 1, params=keep(new_params, params),
                              opt_state=state_after_skip(opt_state, state.opt_state, finite), nonfinite=state.nonfinite + skipped,
                              skips=(state.skips + 1) * skipped)
        metrics = {**measurements, "loss": total, "grad_norm": grad_norm, "param_norm": global_norm(state.params),
                   "skipped_nonfinite": skipped}
        lr = learning_rate(opt_state)
        if lr is not None:
            metrics["lr"] = lr
        return state, metrics

    return update


def updates_per_cycle(config: ml_collections.ConfigDict) -> int:
    """Optimizer updates per scheduler step of a pre-training run config: one per batch of a reference iteration
    (`train.mode` 'alternate': 2 for `data.mix` {parallel_text: 1, image_caption: 1}, also 2 for the 4M mix
    {image_caption: 1, parallel_text: 2, region: 1}, see `Mixture.iterations_per_cycle`) or 1 ('joint')."""
    if config.train.mode == "joint":
        return 1
    mixture = Mixture(dict(config.data.mix))
    return len(mixture.cycle) // mixture.iterations_per_cycle()


def pretraining_losses(cfg: StepConfig, mode: str, kinds: tuple[str, ...] = KINDS) -> dict[str, Callable]:
    """Loss functions keyed by update: one per batch kind of `kinds` ('alternate' mode) or {'joint': all of them}
    ('joint' mode)."""
    if mode not in ("alternate", "joint"):
        raise ValueError(f"config.train.mode must be 'alternate' or 'joint', got {mode!r}")
    groups = {kind: (kind,) for kind in kinds} if mode == "alternate" else {"joint": tuple(kinds)}
    return {name: view_loss_fn(cfg, kinds) for name, kinds in groups.items()}


def pretraining_update_fns(cfg: StepConfig, optimizer: optax.GradientTransformation,
                           mode: str) -> dict[str, Callable]:
    """Un-jitted updates keyed by batch kind ('alternate' mode) or {'joint': update} ('joint' mode)."""
    return {name: make_update_fn(loss_fn, optimizer, prepare_params=clamp_temperature)
            for name, loss_fn in pretraining_losses(cfg, mode).items()}


def jit_step(update: Callable, state_shardings, batch_sharding) -> Callable:
    """jit with the state donated and kept in its shardings; batches arrive sharded over the batch axes."""
    return jax.jit(update, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
                   donate_argnums=(0,))


def make_train_steps(cfg: StepConfig, optimizer: optax.GradientTransformation, mode: str,
                     state_shardings=None, batch_sharding=None) -> dict[str, Callable]:
    """Jitted pre-training steps keyed by batch kind ('alternate' mode) or {'joint': step} ('joint' mode).

    A step is called as `state, metrics = step(state, {kind: batch, ...})`.
    """
    fns = pretraining_update_fns(cfg, optimizer, mode)
    if state_shardings is None:
        return {k: jax.jit(f, donate_argnums=(0,)) for k, f in fns.items()}
    return {k: jit_step(f, state_shardings, batch_sharding) for k, f in fns.items()}
