"""The optimizer: transformers-4.12.5 AdamW as an optax chain, CCLM's parameter groups as regex tables, LambdaLR.

`make_optimizer(optimizer_config, schedule_config, params, updates_per_schedule_step=1)` builds

    optax.inject_hyperparams(learning_rate=schedule(count // updates_per_schedule_step)) of
      chain(clip_by_global_norm_torch(clip_grad_norm),        # torch.nn.utils.clip_grad_norm_ (if configured)
            scale_by_torch_adam(b1, b2, eps),                  # 'reference_adamw': what optax lacks
              or optax.scale_by_adam(b1, b2, eps),             # 'optax_adamw'
            optax.multi_transform({group: its lr x mult step and its weight decay}, group of each parameter))

The schedule is driven by the optimizer's own update count: the reference steps its LR scheduler once per
*iteration* (one parallel-text and one image–caption update, spec §2.5), so pre-training passes
`updates_per_schedule_step` = the updates of one mixture cycle. A skipped (non-finite) update keeps Adam's state
(moments and count) but still advances the schedule (`state_after_skip`): the schedule counts iterations, as the
reference's scheduler does, so a fault tied to one learning rate passes and the schedule ends where configured. The
learning rate of the last update is in the state (`learning_rate(opt_state)`, for metrics).

`optimizer.name` picks the update rule (both share the state layout):
- `reference_adamw` (default): transformers-4.12.5 AdamW exactly. Per parameter, with t its update count,
  lr = learning rate x the parameter's lr multiplier, and wd = weight_decay x its weight-decay multiplier:
      m = b1·m + (1-b1)·g;  v = b2·v + (1-b2)·g²;  a = sqrt(1-b2^t)/(1-b1^t) · m / (sqrt(v) + eps)
      p' = (p - lr·a)·(1 - lr·wd)          (eps outside the bias correction; decay of the *updated* weight)
  The custom `scale_by_torch_adam` gives `a`; the decay of the updated weight is two standard transforms per
  group: `optax.scale(-lr·(1 - lr·wd))` then `optax.add_decayed_weights(-lr·wd)`, since
  p + [-lr·(1-lr·wd)·a - lr·wd·p] = (p - lr·a)·(1 - lr·wd).
- `optax_adamw`: `optax.adamw` with the same groups, schedule and clipping. It differs from the reference in two
  ways: eps is added to the bias-corrected sqrt(v̂) (the reference's eps equals optax's eps / sqrt(1 - b2^t), i.e.
  larger early in training), and decay uses the weights *before* the Adam step (p - lr·(a + wd·p)); the second
  difference is of order lr²·wd.

Parameter groups (CCLM_SPEC §4.1) are regex tables over Flax parameter paths, as big_vision's: a parameter's
name is its path joined with '/' (`text_encoder/layer_7/crossattention/self/query/kernel`, `temp`); the first
pattern of `optimizer.lr_mults` (`optimizer.wd_mults`) that matches the whole name gives its learning-rate
(weight-decay) multiplier; a name no pattern matches gets 1.0. The defaults reproduce the reference's rule on the
official PyTorch names exactly (tests/test_optimizer.py checks every parameter of the full-size model and of every
fine-tuning task): lr x2 for names containing `crossattention, text_proj, vision_proj, temp, itm_head, bbox_head`,
no decay for names containing `bias`, `LayerNorm.weight`, `norm.weight`, `norm1.weight`, `norm2.weight` (substring
match, so `temp`, embeddings and the MLP heads' LayerNorm weight `itm_head.1.weight` ARE decayed and
`relative_position_bias_table` is not).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("reference_adamw", "optax_adamw")
SCHEDULES = ("linear",)

# Parameters that do not come from the XLM-R / Swin initialisation: the reference's `init_params`.
LR_MULTS = (
    (".*/crossattention/.*", 2.0),  # the fusion layers' cross-attention (XLM-R has none)
    ("(text_proj|vision_proj|itm_head|bbox_head)/.*", 2.0),
    ("temp", 2.0),
)
WD_MULTS = (
    (".*_head/norm/scale", 1.0),  # build_mlp's LayerNorm, torch `<head>.1.weight`: no "norm" in the name, decayed
    (".*bias.*", 0.0),  # every bias, Swin's relative_position_bias_table
    (".*(LayerNorm|norm|norm1|norm2)/scale", 0.0),
)
# The `optimizer` keys of earlier versions: substring lists over the official PyTorch names. `upgrade_legacy_section`
# maps the values they wrote by default to the tables above (the same groups).
LEGACY_KEYS = ("lr_mult", "new_param_patterns", "no_decay_patterns")
LEGACY_NEW_PARAM_PATTERNS = ("crossattention", "text_proj", "vision_proj", "temp", "itm_head", "bbox_head")
LEGACY_NO_DECAY_PATTERNS = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight",
                            "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight")
LEGACY_TASK_HEADS = ("cls_head", "text_decoder", "lm_head")  # fine-tuning's lr x2 entries (Flax module names)

Schedule = Callable[[jax.Array], jax.Array]
MultTable = Sequence[tuple[str, float]]


# ----------------------------------------------------------------------------------------------- configs

def default_optimizer_config() -> ml_collections.ConfigDict:
    """The `optimizer` section of a run config: the CCLM pre-training values (CCLM_SPEC §4.1).

    lr is the base learning rate (per update, before the schedule); `lr_mults` / `wd_mults`: (regex, multiplier)
    tables over parameter names (see the module docstring); `clip_grad_norm` is the global L2 norm bound (None
    disables clipping).
    """
    return ml_collections.ConfigDict({
        "name": "reference_adamw",
        "lr": 1e-4,
        "b1": 0.9,
        "b2": 0.98,
        "eps": 1e-8,
        "weight_decay": 0.01,
        "lr_mults": LR_MULTS,
        "wd_mults": WD_MULTS,
        "clip_grad_norm": 1.0,
    })


def default_schedule_config() -> ml_collections.ConfigDict:
    """The `schedule` section: linear warm-up then linear decay, in scheduler steps (iterations).

    total_steps defaults to the 3M pre-training run: 30 epochs × 2,772 iterations = 83,160.
    """
    return ml_collections.ConfigDict({"kind": "linear", "warmup_steps": 2500, "total_steps": 83_160})


def head_lr_mults(heads: Sequence[str], mult: float = 2.0) -> tuple[tuple[str, float], ...]:
    """An `lr_mults` table giving every parameter under the top-level modules `heads` the multiplier `mult`."""
    return tuple((f"{re.escape(head)}/.*", float(mult)) for head in heads)


def _key_errors(section: str, cfg: ml_collections.ConfigDict, default: ml_collections.ConfigDict) -> list[str]:
    errors = []
    missing = sorted(set(default.keys()) - set(cfg.keys()))
    unknown = sorted(set(cfg.keys()) - set(default.keys()))
    if missing:
        errors.append(f"{section} is missing keys {missing}")
    if unknown:
        errors.append(f"{section} has unknown keys {unknown}; expected keys {sorted(default.keys())}")
    if section == "optimizer" and set(unknown) & set(LEGACY_KEYS):
        errors.append("optimizer.lr_mult, new_param_patterns and no_decay_patterns were replaced by the tables "
                      "optimizer.lr_mults and optimizer.wd_mults: ((regex over Flax paths, multiplier), ...), "
                      "see cclm_jax/optimizer.py")
    return errors


def _table_errors(key: str, table: Any) -> list[str]:
    if isinstance(table, str) or not isinstance(table, Sequence):
        return [f"optimizer.{key} must be a list of (regex, multiplier) pairs, got {table!r}"]
    errors = []
    for i, entry in enumerate(table):
        if (isinstance(entry, str) or not isinstance(entry, Sequence) or len(entry) != 2
                or not isinstance(entry[0], str) or not entry[0] or isinstance(entry[1], bool)
                or not isinstance(entry[1], (int, float)) or entry[1] < 0):
            errors.append(f"optimizer.{key}[{i}] must be a (regex, multiplier >= 0) pair, got {entry!r}")
            continue
        if entry[0].startswith("/"):
            errors.append(f"optimizer.{key}[{i}] pattern {entry[0]!r} starts with '/': parameter names do not "
                          "(e.g. 'text_encoder/layer_0/attention/self/query/kernel')")
            continue
        try:
            re.compile(entry[0])
        except re.error as e:
            errors.append(f"optimizer.{key}[{i}] pattern {entry[0]!r} is not a regular expression: {e}")
    return errors


def _optimizer_errors(o: ml_collections.ConfigDict) -> list[str]:
    errors = []
    if o.name not in OPTIMIZERS:
        errors.append(f"optimizer.name {o.name!r} is not one of {OPTIMIZERS}")
    numbers = ("lr", "b1", "b2", "eps", "weight_decay")
    not_numbers = [k for k in numbers if isinstance(o[k], bool) or not isinstance(o[k], (int, float))]
    errors += [f"optimizer.{k} must be a number, got {o[k]!r}" for k in not_numbers]
    errors += _table_errors("lr_mults", o.lr_mults) + _table_errors("wd_mults", o.wd_mults)
    if not_numbers:
        return errors
    if o.lr < 0:
        errors.append(f"optimizer.lr must be >= 0, got {o.lr}")
    errors += [f"optimizer.{k} must be in [0, 1), got {o[k]}" for k in ("b1", "b2") if not 0 <= o[k] < 1]
    if not o.eps > 0:
        errors.append(f"optimizer.eps must be > 0, got {o.eps}")
    if o.weight_decay < 0:
        errors.append(f"optimizer.weight_decay must be >= 0, got {o.weight_decay}")
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


def upgrade_legacy_section(saved: dict) -> dict:
    """An `optimizer` section read from the `config.json` of a run written before the regex tables, in the current
    keys when it holds what those versions wrote by default (pre-training's lists, or fine-tuning's task heads with
    the no-decay list plus `LayerNorm.scale`): the same groups, as the tests prove on the full-size trees. Any other
    section is returned unchanged (the run-directory check then names the differing keys)."""
    if not set(LEGACY_KEYS) <= set(saved):
        return saved
    new, no_decay, mult = tuple(saved["new_param_patterns"]), tuple(saved["no_decay_patterns"]), saved["lr_mult"]
    if new == LEGACY_NEW_PARAM_PATTERNS and no_decay == LEGACY_NO_DECAY_PATTERNS:
        lr_mults = tuple((p, float(mult)) for p, _ in LR_MULTS)
    elif set(new) <= set(LEGACY_TASK_HEADS) and no_decay == LEGACY_NO_DECAY_PATTERNS + ("LayerNorm.scale",):
        lr_mults = head_lr_mults(new, mult)
    else:
        return saved
    upgraded = {k: v for k, v in saved.items() if k not in LEGACY_KEYS}
    upgraded.update(lr_mults=[list(e) for e in lr_mults], wd_mults=[list(e) for e in WD_MULTS])
    return upgraded


# ---------------------------------------------------------------------------------------- parameter groups

def param_name(path: tuple) -> str:
    """A parameter's name in the regex tables: its Flax path joined with '/'."""
    keys = []
    for entry in path:
        if not isinstance(entry, jax.tree_util.DictKey):
            raise ValueError(f"parameter path {jax.tree_util.keystr(path)} has a non-dict entry {entry!r}; "
                             "pass plain (unboxed) params, e.g. flax.linen.meta.unbox(params)")
        keys.append(str(entry.key))
    return "/".join(keys)


def param_multipliers(params: Any, table: MultTable, key: str = "lr_mults") -> Any:
    """The multiplier of every parameter (a tree of Python floats like `params`): the first pattern of `table`
    that matches its whole name (`param_name`), else 1.0. A pattern that is the first match of no parameter is
    logged as a warning naming `optimizer.<key>` (usually a typo, or a table for a model without that part).
    `params`: the plain nested dict of parameters (arrays or ShapeDtypeStructs; only the paths matter)."""
    compiled = [(re.compile(pattern), float(mult)) for pattern, mult in table]
    used = [False] * len(compiled)

    def mult(path, _):
        name = param_name(path)
        for i, (pattern, value) in enumerate(compiled):
            if pattern.fullmatch(name):
                used[i] = True
                return value
        return 1.0

    out = jax.tree_util.tree_map_with_path(mult, params)
    for (pattern, _), hit in zip(table, used):
        if not hit:
            logging.warning("optimizer.%s entry %r matches no parameter", key, pattern)
    return out


# ------------------------------------------------------------------------------------------------ schedule

def linear_warmup_linear_decay(base_lr: float, warmup_steps: int, total_steps: int) -> Schedule:
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

def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_(params, max_norm): g *= min(1, max_norm / (‖g‖₂ + 1e-6)).

    ‖g‖₂ is the L2 norm over all gradients (float32). optax.clip_by_global_norm scales by max_norm / ‖g‖₂.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        coef = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_torch_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's direction as transformers-4.12.5 computes it, eps outside the bias correction:

        m = b1·m + (1-b1)·g;  v = b2·v + (1-b2)·g²;  a = sqrt(1-b2^t)/(1-b1^t) · m / (sqrt(v) + eps)

    i.e. optax.scale_by_adam with eps / sqrt(1 - b2^t) in place of eps. t: the update count after this update.
    State: `optax.ScaleByAdamState` (count: int32 scalar; mu, nu: float32 like the parameters).
    """

    def init_fn(params):
        mu = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
        return optax.ScaleByAdamState(count=jnp.zeros((), jnp.int32), mu=mu, nu=jax.tree.map(jnp.zeros_like, mu))

    def update_fn(updates, state, params=None):
        del params
        g = jax.tree.map(lambda x: x.astype(jnp.float32), updates)
        mu = jax.tree.map(lambda m, x: b1 * m + (1.0 - b1) * x, state.mu, g)
        nu = jax.tree.map(lambda v, x: b2 * v + (1.0 - b2) * x * x, state.nu, g)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        correction = jnp.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
        direction = jax.tree.map(lambda m, v: correction * m / (jnp.sqrt(v) + eps), mu, nu)
        return direction, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _group_step(name: str, lr: jax.Array, weight_decay: float) -> optax.GradientTransformation:
    """Adam direction -> update of one parameter group; `lr` and `weight_decay` already carry its multipliers."""
    if weight_decay == 0.0:
        return optax.scale(-lr)
    if name == "reference_adamw":  # (p - lr·a)·(1 - lr·wd), see the module docstring
        rate = lr * weight_decay
        return optax.chain(optax.scale(-lr * (1.0 - rate)), optax.add_decayed_weights(-rate))
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.scale(-lr))


def make_optimizer(optimizer_config: ml_collections.ConfigDict, schedule_config: ml_collections.ConfigDict,
                   params: Any, updates_per_schedule_step: int = 1) -> optax.GradientTransformation:
    """The run's optimizer (see the module docstring); validates both config sections first.

    `params`: the plain parameter dict (or its ShapeDtypeStructs): only its paths are used, for the groups.
    `updates_per_schedule_step`: optimizer updates per scheduler step (pre-training: the updates of one mixture
    cycle; fine-tuning: 1). `update(grads, state, params)` needs `params` (weight decay).
    """
    validate_optimizer_config(optimizer_config, schedule_config)
    if isinstance(updates_per_schedule_step, bool) or not isinstance(updates_per_schedule_step, int) or (
            updates_per_schedule_step < 1):
        raise ValueError(f"updates_per_schedule_step must be a positive integer, got {updates_per_schedule_step!r}")
    o, s = optimizer_config, schedule_config
    lr_mults = param_multipliers(params, o.lr_mults, "lr_mults")
    wd_mults = param_multipliers(params, o.wd_mults, "wd_mults")
    groups = sorted(set(zip(jax.tree.leaves(lr_mults), jax.tree.leaves(wd_mults))))
    labels = jax.tree.map(lambda lr_mult, wd_mult: f"lr×{lr_mult!r} wd×{wd_mult!r}", lr_mults, wd_mults)
    schedule = linear_warmup_linear_decay(o.lr, s.warmup_steps, s.total_steps)

    def chain(learning_rate: jax.Array) -> optax.GradientTransformation:
        clip = [clip_by_global_norm_torch(o.clip_grad_norm)] if o.clip_grad_norm is not None else []
        adam = (scale_by_torch_adam if o.name == "reference_adamw" else optax.scale_by_adam)(o.b1, o.b2, o.eps)
        steps = {f"lr×{lr_mult!r} wd×{wd_mult!r}": _group_step(o.name, learning_rate * lr_mult,
                                                               o.weight_decay * wd_mult)
                 for lr_mult, wd_mult in groups}
        return optax.chain(*clip, adam, optax.multi_transform(steps, labels))

    return optax.inject_hyperparams(chain)(
        learning_rate=lambda count: schedule(count // updates_per_schedule_step))


def state_after_skip(new_state: Any, old_state: Any, finite: jax.Array) -> Any:
    """The optimizer state after an update that was applied (`finite` True: `new_state`) or skipped (False:
    `old_state`, except that a `make_optimizer` state's schedule position and learning rate are `new_state`'s)."""
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, old_state)
    if isinstance(new_state, optax.InjectStatefulHyperparamsState):
        kept = kept._replace(count=new_state.count, hyperparams=new_state.hyperparams,
                             hyperparams_states=new_state.hyperparams_states)
    return kept


def learning_rate(opt_state: Any) -> jax.Array | None:
    """The learning rate (before multipliers) of the update that produced `opt_state` (a `make_optimizer` state),
    or None for an optimizer that does not hold one."""
    hyperparams = getattr(opt_state, "hyperparams", None)
    return hyperparams.get("learning_rate") if isinstance(hyperparams, dict) else None


# ------------------------------------------------------------------------------- states of earlier versions

def _find_adam(tree: Any, is_adam: Callable[[Any], bool]) -> list[Any]:
    if is_adam(tree):
        return [tree]
    children = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return [found for child in children for found in _find_adam(child, is_adam)]


def _is_stored_adam(node: Any) -> bool:
    return isinstance(node, dict) and set(node) == {"count", "mu", "nu"}


def upgrade_legacy_state(stored: Any, abstract_state: Any) -> tuple[Any, Callable[[Any, Any], Any]]:
    """How to read the optimizer state of a checkpoint written by an earlier version into this version's layout.

    Earlier versions held the moments in one `{count, mu, nu}` state inside a chain: `reference_adamw` with an
    int32 count per parameter (always equal: every update stepped every parameter), `optax_adamw` with one count.
    `stored`: the stored item's tree as Orbax lists it (lists for tuples, dicts for named tuples, None for empty
    states); `abstract_state`: ShapeDtypeStructs with shardings of a `make_optimizer` state for the same
    parameters. Returns `(target, upgrade)`: the abstract tree to restore the stored item into (moments in this
    version's shardings), and `upgrade(restored, step) -> state`, where `step` is the run's step (updates so far):
    the schedule's position, as earlier versions derived it from the step. Adam's count is the stored one; the
    learning rate held for metrics starts at 0 (the next update sets it). Raises ValueError when `stored` holds
    no such state or its moments are not those of these parameters.
    """
    found = _find_adam(stored, _is_stored_adam)
    if len(found) != 1:
        raise ValueError(f"its optimizer state holds {len(found)} AdamW states (count, mu, nu), expected 1")
    adam = _find_adam(abstract_state, lambda node: isinstance(node, optax.ScaleByAdamState))[0]
    if jax.tree.structure(found[0]["mu"]) != jax.tree.structure(adam.mu):
        raise ValueError("its AdamW moments are not those of this run's parameters")
    per_leaf = not hasattr(found[0]["count"], "shape")  # reference_adamw: a count per parameter

    def to_target(node):
        if _is_stored_adam(node):
            count = jax.tree.map(lambda _: adam.count, adam.mu) if per_leaf else adam.count
            return {"count": count, "mu": adam.mu, "nu": adam.nu}
        if isinstance(node, dict):
            return {k: to_target(v) for k, v in node.items()}
        if isinstance(node, list):
            return [to_target(v) for v in node]
        if node is None:
            return None
        raise ValueError(f"its optimizer state has an entry this version does not know: {node!r}")

    def upgrade(restored: Any, step: Any) -> Any:
        old = _find_adam(restored, _is_stored_adam)[0]
        counts = {int(c) for c in jax.device_get(jax.tree.leaves(old["count"]))}
        if len(counts) != 1:
            raise ValueError(f"its parameters have different AdamW update counts {sorted(counts)}")

        def place(value, like):
            return jax.device_put(jnp.asarray(value, like.dtype), like.sharding)

        new_adam = optax.ScaleByAdamState(count=place(counts.pop(), adam.count), mu=old["mu"], nu=old["nu"])
        return abstract_state._replace(
            count=place(step, abstract_state.count),
            hyperparams=jax.tree.map(lambda like: place(0, like), abstract_state.hyperparams),
            hyperparams_states=jax.tree.map(lambda like: place(step, like), abstract_state.hyperparams_states),
            inner_state=tuple(new_adam if isinstance(s, optax.ScaleByAdamState) else s
                              for s in abstract_state.inner_state))

    return to_target(stored), upgrade
