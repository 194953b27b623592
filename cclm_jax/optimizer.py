"""The reference optimizer: AdamW as in transformers 4.12.5, CCLM's parameter groups, the LambdaLR schedule.

Everything here is an optax transformation whose `update` takes one extra keyword argument,
`schedule_step` (int32 scalar): the reference steps its LR scheduler once per *iteration* (one image–caption
update and one parallel-text update), so the learning rate is not a function of the optimizer's own
update count. The count that drives Adam's bias correction is the optimizer's own (per parameter).

Parameter groups (CCLM_SPEC §4.1) are decided on each parameter's official PyTorch name
(`cclm_jax.interop.layout.torch_names`), or, for parameters the official layout does not name (task heads
added for fine-tuning), on the Flax path joined with '.':
- no weight decay when the name contains any of `no_decay_patterns` (plain substring match, so `temp`,
  embeddings and the LayerNorm weight `itm_head.1.weight` ARE decayed, `relative_position_bias_table` is not);
- learning rate × `lr_mult` when the name contains any of `new_param_patterns` (parameters that do not come
  from the XLM-R / Swin initialisation).

`optimizer.name` picks the update rule:
- `reference_adamw` (default): transformers-4.12.5 AdamW, exactly (see `reference_adamw`).
- `optax_adamw`: `optax.adamw` with the same masks, multipliers, schedule and clipping. It differs from the
  reference in two ways: eps is added to the bias-corrected sqrt(v̂) (the reference's eps equals optax's
  eps / sqrt(1 - b2^t), i.e. larger early in training), and decay uses the weights *before* the Adam step
  (p - lr·(adam + wd·p) instead of (p - lr·adam)·(1 - lr·wd)); the second difference is of order lr²·wd.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cclm_jax.interop.layout import torch_names

NO_DECAY_PATTERNS = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight",
                     "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight")
NEW_PARAM_PATTERNS = ("crossattention", "text_proj", "vision_proj", "temp", "itm_head", "bbox_head")
OPTIMIZERS = ("reference_adamw", "optax_adamw")
SCHEDULES = ("linear",)

LearningRateFn = Callable[[jax.Array], jax.Array]


# ----------------------------------------------------------------------------------------------- configs

def default_optimizer_config() -> ml_collections.ConfigDict:
    """The `optimizer` section of a run config: the CCLM pre-training values (CCLM_SPEC §4.1).

    lr is the base learning rate (per update, before the schedule); `lr_mult` multiplies it for parameters
    matching `new_param_patterns`; `clip_grad_norm` is the global L2 norm bound (None disables clipping);
    `tower_lr_mults`: (name prefix, multiplier) pairs, the first prefix a parameter's name starts with scales its
    lr too (CCLM-X2VLM's per-tower rates: lr 4e-5 for the cross encoder, `(('vision_encoder.', 0.5),
    ('text_encoder.', 2.0))` for vision 2e-5 and text 8e-5; empty: one rate).
    """
    return ml_collections.ConfigDict({
        "name": "reference_adamw",
        "lr": 1e-4,
        "b1": 0.9,
        "b2": 0.98,
        "eps": 1e-8,
        "weight_decay": 0.01,
        "lr_mult": 2.0,
        "new_param_patterns": NEW_PARAM_PATTERNS,
        "no_decay_patterns": NO_DECAY_PATTERNS,
        "clip_grad_norm": 1.0,
        "tower_lr_mults": (),
    })


def default_schedule_config() -> ml_collections.ConfigDict:
    """The `schedule` section: linear warm-up then linear decay, in scheduler steps (iterations).

    total_steps defaults to the 3M pre-training run: 30 epochs × 2,772 iterations = 83,160.
    """
    return ml_collections.ConfigDict({"kind": "linear", "warmup_steps": 2500, "total_steps": 83_160})


def _key_errors(section: str, cfg: ml_collections.ConfigDict, default: ml_collections.ConfigDict) -> list[str]:
    errors = []
    missing = sorted(set(default.keys()) - set(cfg.keys()))
    unknown = sorted(set(cfg.keys()) - set(default.keys()))
    if missing:
        errors.append(f"{section} is missing keys {missing}")
    if unknown:
        errors.append(f"{section} has unknown keys {unknown}; expected keys {sorted(default.keys())}")
    return errors


def _optimizer_errors(o: ml_collections.ConfigDict) -> list[str]:
    errors = []
    if o.name not in OPTIMIZERS:
        errors.append(f"optimizer.name {o.name!r} is not one of {OPTIMIZERS}")
    numbers = ("lr", "b1", "b2", "eps", "weight_decay", "lr_mult")
    not_numbers = [k for k in numbers if isinstance(o[k], bool) or not isinstance(o[k], (int, float))]
    errors += [f"optimizer.{k} must be a number, got {o[k]!r}" for k in not_numbers]
    if not_numbers:
        return errors
    if o.lr < 0:
        errors.append(f"optimizer.lr must be >= 0, got {o.lr}")
    errors += [f"optimizer.{k} must be in [0, 1), got {o[k]}" for k in ("b1", "b2") if not 0 <= o[k] < 1]
    if not o.eps > 0:
        errors.append(f"optimizer.eps must be > 0, got {o.eps}")
    if o.weight_decay < 0:
        errors.append(f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
    if not o.lr_mult > 0:
        errors.append(f"optimizer.lr_mult must be > 0, got {o.lr_mult}")
    for key in ("new_param_patterns", "no_decay_patterns"):
        value = o[key]
        if isinstance(value, str) or not isinstance(value, Sequence) or not all(
                isinstance(p, str) and p for p in value):
            errors.append(f"optimizer.{key} must be a list of non-empty strings, got {value!r}")
    pairs = o.tower_lr_mults
    if isinstance(pairs, str) or not all(
            isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) and p[0]
            and isinstance(p[1], (int, float)) and not isinstance(p[1], bool) and p[1] > 0 for p in pairs):
        errors.append(f"optimizer.tower_lr_mults must be (name prefix, multiplier > 0) pairs, got {pairs!r}")
    clip = o.clip_grad_norm
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        errors.append(f"optimizer.clip_grad_norm must be a number > 0 or None (no clipping), got {clip!r}")
    return errors


def _schedule_errors(s: ml_collections.ConfigDict) -> list[str]:
    errors = []
    if s.kind not in SCHEDULES:
        errors.append(f"schedule.kind {s.kind!r} is not one of {SCHEDULES}")
    bad = [k for k in ("warmup_steps", "total_steps")
           if isinstance(s[k], bool) or not isinstance(s[k], int) or s[k] < 0]
    errors += [f"schedule.{k} must be a non-negative integer, got {s[k]!r}" for k in bad]
    if bad:
        return errors
    if s.total_steps == 0:
        errors.append("schedule.total_steps must be > 0")
    if s.warmup_steps > s.total_steps:
        errors.append(f"schedule.warmup_steps {s.warmup_steps} exceeds schedule.total_steps {s.total_steps}")
    return errors


def validate_optimizer_config(optimizer_config: ml_collections.ConfigDict,
                              schedule_config: ml_collections.ConfigDict) -> None:
    """Raise ValueError listing every invalid field of the `optimizer` and `schedule` sections."""
    errors = (_key_errors("optimizer", optimizer_config, default_optimizer_config())
              + _key_errors("schedule", schedule_config, default_schedule_config()))
    if not errors:
        errors = _optimizer_errors(optimizer_config) + _schedule_errors(schedule_config)
    if errors:
        raise ValueError("invalid optimizer config:\n  " + "\n  ".join(errors))


# ---------------------------------------------------------------------------------------- parameter groups

def _group_name(path: tuple, names: dict[tuple[str, ...], str]) -> str:
    keys = []
    for entry in path:
        if not isinstance(entry, jax.tree_util.DictKey):
            raise ValueError(f"parameter path {jax.tree_util.keystr(path)} has a non-dict entry {entry!r}; "
                             "pass plain (unboxed) params, e.g. flax.linen.meta.unbox(params)")
        keys.append(str(entry.key))
    keys = tuple(keys)
    return names.get(keys, ".".join(keys))


def param_groups(params: Any, model_config: ml_collections.ConfigDict, *,
                 no_decay_patterns: Sequence[str] = NO_DECAY_PATTERNS,
                 new_param_patterns: Sequence[str] = NEW_PARAM_PATTERNS,
                 lr_mult: float = 2.0, tower_lr_mults: Sequence[tuple[str, float]] = ()) -> tuple[Any, Any]:
    """Weight-decay mask and learning-rate multipliers of every parameter (CCLM_SPEC §4.1).

    `params`: the plain nested dict of parameters (arrays or ShapeDtypeStructs; only the paths matter).
    Returns `(decay_mask, lr_mult_tree)`, both with the structure of `params`: Python bools (True = decayed)
    and Python floats (`lr_mult` for new parameters, 1.0 otherwise, times the multiplier of the first
    `tower_lr_mults` prefix the name starts with). A new-parameter pattern that matches no
    parameter is logged as a warning (usually a typo, or the pre-training list used with a model without
    that part).
    """
    names = torch_names(model_config)
    group_names = jax.tree_util.tree_map_with_path(lambda path, _: _group_name(path, names), params)
    all_names = jax.tree_util.tree_leaves(group_names)
    for pattern in new_param_patterns:
        if not any(pattern in name for name in all_names):
            logging.warning("optimizer.new_param_patterns entry %r matches no parameter", pattern)
    decay_mask = jax.tree.map(lambda n: not any(p in n for p in no_decay_patterns), group_names)
    def multiplier(name: str) -> float:
        tower = next((float(m) for prefix, m in tower_lr_mults if name.startswith(prefix)), 1.0)
        return tower * (float(lr_mult) if any(p in name for p in new_param_patterns) else 1.0)

    lr_mult_tree = jax.tree.map(multiplier, group_names)
    return decay_mask, lr_mult_tree


# ------------------------------------------------------------------------------------------------ schedule

def linear_warmup_linear_decay(base_lr: float, warmup_steps: int, total_steps: int) -> LearningRateFn:
    """LambdaLR's linear schedule: lr(k) = base_lr·k/warmup for k < warmup, else base_lr·max(0, (T-k)/(T-warmup)).

    `k` is the scheduler step (an int32 scalar array or int); lr(0) = 0. Denominators are at least 1, as in
    the reference. Returns a float32 scalar; jit-friendly.
    """
    warmup_div = float(max(1, warmup_steps))
    decay_div = float(max(1, total_steps - warmup_steps))

    def schedule(step: jax.Array) -> jax.Array:
        k = jnp.asarray(step).astype(jnp.float32)
        warm = k / warmup_div
        decay = jnp.maximum(0.0, (total_steps - k) / decay_div)
        return base_lr * jnp.where(k < warmup_steps, warm, decay)

    return schedule


# ---------------------------------------------------------------------------------------- transformations

def _require_schedule_step(schedule_step: jax.Array | int | None, name: str) -> jax.Array:
    if schedule_step is None:
        raise ValueError(f"{name}.update needs the keyword argument schedule_step (int32 scalar: the LR "
                         "scheduler's step, which advances once per iteration, not once per update)")
    return jnp.asarray(schedule_step, jnp.int32)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """torch.nn.utils.clip_grad_norm_(params, max_norm): g *= min(1, max_norm / (‖g‖₂ + 1e-6)).

    ‖g‖₂ is the L2 norm over all gradients (float32). `update` accepts the optional extra argument `active`
    (see `reference_adamw`): inactive gradients are left out of the norm, as torch leaves out `.grad is None`.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, active=None, **extra_args):
        del params, extra_args
        counted = updates if active is None else jax.tree.map(
            lambda g, a: jnp.where(a, g, jnp.zeros_like(g)), updates, active)
        norm = optax.tree.norm(counted)
        coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ReferenceAdamWState(NamedTuple):
    """count: int32 scalar per parameter, updates applied so far; mu, nu: first/second moments (float32)."""

    count: Any
    mu: Any
    nu: Any


def reference_adamw(learning_rate_fn: LearningRateFn, b1: float, b2: float, eps: float, weight_decay: float,
                    decay_mask: Any, lr_mult_tree: Any) -> optax.GradientTransformationExtraArgs:
    """transformers-4.12.5 AdamW (correct_bias=True), per parameter with t = its update count + 1:

        m = b1·m + (1-b1)·g;  v = b2·v + (1-b2)·g²
        p' = p - lr·sqrt(1-b2^t)/(1-b1^t) · m / (sqrt(v) + eps)      (eps not bias-corrected)
        p'' = p' - lr·wd·p'   if decayed                             (decay of the already-updated weight)

    with lr = learning_rate_fn(schedule_step) · lr_mult. `decay_mask` / `lr_mult_tree`: from `param_groups`.
    `update(grads, state, params, *, schedule_step, active=None)` returns `p'' - p`. `active` (optional, a
    tree of bool scalars like `params`) marks the parameters that had a gradient: inactive ones are left
    exactly as torch leaves a parameter whose `.grad is None` (no moment update, no decay, count unchanged).
    """

    def init_fn(params):
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
        count = jax.tree.map(lambda p: jnp.zeros((), jnp.int32), params)
        return ReferenceAdamWState(count=count, mu=zeros, nu=jax.tree.map(jnp.zeros_like, zeros))

    def update_fn(updates, state, params=None, *, schedule_step=None, active=None, **extra_args):
        del extra_args
        step = _require_schedule_step(schedule_step, "reference_adamw")
        if params is None:
            raise ValueError("reference_adamw.update needs params (weight decay acts on the weights)")
        base_lr = learning_rate_fn(step)

        def leaf(g, p, m, v, count, decay, mult):
            g = g.astype(jnp.float32)
            t = count + 1
            m_new = b1 * m + (1.0 - b1) * g
            v_new = b2 * v + (1.0 - b2) * g * g
            lr = base_lr * mult
            tf = t.astype(jnp.float32)
            step_size = lr * jnp.sqrt(1.0 - b2 ** tf) / (1.0 - b1 ** tf)
            p_adam = p - step_size * m_new / (jnp.sqrt(v_new) + eps)
            p_new = p_adam - lr * weight_decay * p_adam if decay and weight_decay > 0 else p_adam
            return (p_new - p).astype(p.dtype), m_new, v_new, t

        out = jax.tree.map(leaf, updates, params, state.mu, state.nu, state.count, decay_mask, lr_mult_tree)
        treedef = jax.tree.structure(params)
        new_updates, mu, nu, count = (treedef.unflatten(x) for x in zip(*treedef.flatten_up_to(out)))
        if active is not None:
            new_updates = jax.tree.map(lambda on, u: jnp.where(on, u, jnp.zeros_like(u)), active, new_updates)
            mu, nu, count = (jax.tree.map(jnp.where, active, new, old)
                             for new, old in ((mu, state.mu), (nu, state.nu), (count, state.count)))
        return new_updates, ReferenceAdamWState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_scheduled_lr(learning_rate_fn: LearningRateFn, lr_mult_tree: Any) -> optax.GradientTransformationExtraArgs:
    """Multiply each update by learning_rate_fn(schedule_step) · its lr multiplier (sign unchanged)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, schedule_step=None, active=None, **extra_args):
        del params, extra_args
        if active is not None:
            raise ValueError("optax_adamw does not support `active` (parameters without a gradient); "
                             "use optimizer.name='reference_adamw'")
        lr = learning_rate_fn(_require_schedule_step(schedule_step, "optax_adamw"))
        return jax.tree.map(lambda u, mult: (u * (lr * mult)).astype(u.dtype), updates, lr_mult_tree), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_optimizer(optimizer_config: ml_collections.ConfigDict, schedule_config: ml_collections.ConfigDict,
                   params: Any, model_config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """Clipping (if configured) chained with the configured AdamW; validates both config sections first.

    `params`: the plain parameter dict (or its ShapeDtypeStructs) — only its paths are used, to build the
    groups. The result's `update(grads, state, params, *, schedule_step)` needs the scheduler step;
    `reference_adamw` also accepts `active` (see there).
    """
    validate_optimizer_config(optimizer_config, schedule_config)
    o, s = optimizer_config, schedule_config
    decay_mask, lr_mult_tree = param_groups(
        params, model_config, no_decay_patterns=tuple(o.no_decay_patterns),
        new_param_patterns=tuple(o.new_param_patterns), lr_mult=o.lr_mult,
        tower_lr_mults=tuple(tuple(p) for p in o.get("tower_lr_mults", ())))
    lr_fn = linear_warmup_linear_decay(o.lr, s.warmup_steps, s.total_steps)
    if o.name == "reference_adamw":
        adam = reference_adamw(lr_fn, o.b1, o.b2, o.eps, o.weight_decay, decay_mask, lr_mult_tree)
    else:
        adam = optax.chain(
            optax.adamw(learning_rate=1.0, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                        mask=decay_mask),
            scale_by_scheduled_lr(lr_fn, lr_mult_tree))
    if o.clip_grad_norm is None:
        return optax.chain(adam)
    return optax.chain(clip_by_global_norm_torch(o.clip_grad_norm), adam)
