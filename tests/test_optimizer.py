"""The reference AdamW, parameter groups and schedule against an independent numpy implementation.

The numpy reference below is written from the formulas of transformers-4.12.5 AdamW, torch LambdaLR and
torch.nn.utils.clip_grad_norm_ (CCLM_SPEC §4.1), in float64, without calling cclm_jax.optimizer. The reference's
parameter groups are its substring rule on the official PyTorch names (`substring_groups`, as earlier versions
of cclm_jax applied it); the regex tables must give the same groups on every full-size tree.
"""
import json
import math
import pathlib
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from cclm_jax import optimizer as opt
from cclm_jax.checkpoint import Checkpointer, LegacyTrainState, OptimizerStateLayoutError
from cclm_jax.interop.layout import LAYOUT_TASKS, torch_names
from cclm_jax.interop.shapes import abstract_params, param_shapes
from cclm_jax.models import tiny_model_config
from cclm_jax.tasks import definitions
from cclm_jax.train import run_directory
from cclm_jax.train_state import create_train_state

REPO = pathlib.Path(__file__).resolve().parents[1]
NO_DECAY = ["bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight",
            "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight"]
NEW = ["crossattention", "text_proj", "vision_proj", "temp", "itm_head", "bbox_head"]


@pytest.fixture(scope="module")
def tiny():
    """(model_config, params): the tiny model's parameter tree (real paths and shapes), seeded values."""
    cfg = tiny_model_config()
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda shape: (0.5 * rng.standard_normal(shape)).astype(np.float32),
                          param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    return cfg, params


def _flat(tree) -> dict[tuple[str, ...], np.ndarray]:
    return {tuple(k.key for k in path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def substring_groups(params, names: dict, new, no_decay, lr_mult: float = 2.0) -> dict[tuple, tuple[bool, float]]:
    """The reference's rule (CCLM_SPEC §4.1): (decayed, lr multiplier) of every parameter from its official name
    (`names`, else the Flax path joined with '.'), by substring match."""
    out = {}
    for path in _flat(params):
        name = names.get(path, ".".join(path))
        out[path] = (not any(p in name for p in no_decay), lr_mult if any(p in name for p in new) else 1.0)
    return out


def regex_groups(params, optimizer_config) -> dict[tuple, tuple[bool, float]]:
    lr = _flat(opt.param_multipliers(params, optimizer_config.lr_mults))
    wd = _flat(opt.param_multipliers(params, optimizer_config.wd_mults))
    return {path: (bool(wd[path] > 0), float(lr[path])) for path in lr}


# ------------------------------------------------------------------------------------- numpy reference

def np_lambda(k: int, warmup: int, total: int) -> float:
    if k < warmup:
        return k / max(1, warmup)
    return max(0.0, (total - k) / max(1, total - warmup))


class NumpyAdamW:
    """transformers-4.12.5 AdamW with the CCLM groups, clip_grad_norm_ and LambdaLR, per torch name."""

    def __init__(self, params, names, lr, warmup, total, b1, b2, eps, wd, max_norm, lr_mult=2.0):
        self.p = {k: v.astype(np.float64) for k, v in params.items()}
        self.names, self.lr, self.warmup, self.total = names, lr, warmup, total
        self.b1, self.b2, self.eps, self.wd, self.max_norm, self.lr_mult = b1, b2, eps, wd, max_norm, lr_mult
        self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.step = 0

    def update(self, grads, schedule_step):
        g = {k: v.astype(np.float64) for k, v in grads.items()}
        total_norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
        clip_coef = self.max_norm / (total_norm + 1e-6)
        if clip_coef < 1:
            g = {k: x * clip_coef for k, x in g.items()}
        self.step += 1
        factor = np_lambda(schedule_step, self.warmup, self.total)
        for k in self.p:
            name = self.names[k]
            group_lr = self.lr * (self.lr_mult if any(s in name for s in NEW) else 1.0)
            group_wd = 0.0 if any(s in name for s in NO_DECAY) else self.wd
            lr = group_lr * factor
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g[k]
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g[k] * g[k]
            step_size = lr * math.sqrt(1 - self.b2 ** self.step) / (1 - self.b1 ** self.step)
            self.p[k] = self.p[k] - step_size * self.m[k] / (np.sqrt(self.v[k]) + self.eps)
            self.p[k] = self.p[k] - lr * group_wd * self.p[k]


# ------------------------------------------------------------------------------------------------- tests

def test_reference_adamw_matches_numpy_over_warmup_and_decay(tiny):
    """Pre-training's cycle of two updates per scheduler step, the second one (the parallel-text kind) with zero
    gradients for the vision tower: torch steps such a parameter as any other (its `.grad` was zeroed, not None):
    moments decay, the weight is decayed, the shared step count advances, as the numpy reference does."""
    cfg, params = tiny
    names = torch_names(cfg)
    ocfg = opt.default_optimizer_config()
    ocfg.update(lr=0.05, weight_decay=0.1)  # large, so decay order and lr x2 are visible at 1e-6
    scfg = ml_collections.ConfigDict({"kind": "linear", "warmup_steps": 2, "total_steps": 6})
    tx = opt.make_optimizer(ocfg, scfg, params, updates_per_schedule_step=2)
    ref = NumpyAdamW(_flat(params), names, 0.05, 2, 6, 0.9, 0.98, 1e-8, 0.1, 1.0)

    @jax.jit
    def step(p, state, g):
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    rng = np.random.default_rng(1)
    n = sum(x.size for x in jax.tree.leaves(params))
    # scheduler steps 0..7: lr 0 (k=0), warm-up (k=1), decay (k=2..5), past the end (k=6, 7 -> 0); norms > and < 1
    p, state = params, tx.init(params)
    for i in range(16):
        k, norm = i // 2, (3.0, 0.5)[(i // 2) % 2]
        grads = {path: (norm / math.sqrt(n)) * rng.standard_normal(x.shape).astype(np.float32)
                 for path, x in _flat(params).items()}
        for small in (("temp",), ("itm_head", "fc2", "bias")):  # |g| ~ eps: eps placement matters
            grads[small] = grads[small] * np.float32(1e-5)
        if i % 2:  # the other kind's update: the vision tower has no gradient
            grads = {path: g * 0 if path[0] == "vision_encoder" else g for path, g in grads.items()}
        tree = jax.tree_util.tree_unflatten(jax.tree.structure(params),
                                            [grads[path] for path in _flat(params)])
        before = _flat(p)
        p, state = step(p, state, tree)
        ref.update(grads, k)
        got = _flat(p)
        worst = max(float(np.max(np.abs(got[key] - ref.p[key]))) for key in got)
        assert worst < 1e-6, (i, worst)  # measured 7.1e-7 (5.5e-7 with the earlier fused update)
        assert float(opt.learning_rate(state)) == pytest.approx(0.05 * np_lambda(k, 2, 6), rel=1e-6)
        if k == 0:  # LambdaLR starts at factor 0: no change at all
            assert all(np.array_equal(got[key], before[key]) for key in got)
    adam = state.inner_state[1]
    assert int(adam.count) == int(state.count) == 16
    for moments, expected in ((adam.mu, ref.m), (adam.nu, ref.v)):
        for key, got in _flat(moments).items():  # float32 sums of mixed-sign terms: error relative to the leaf
            np.testing.assert_allclose(got, expected[key], rtol=6e-7,  # measured 2.7e-7 (rtol = atol scale)
                                       atol=6e-7 * np.max(np.abs(expected[key])))


def _full_size_model():
    sys.path.insert(0, str(REPO / "configs"))
    import cclm_base  # noqa: PLC0415  (configs/cclm_base.py)

    return cclm_base.get_config().model


@pytest.mark.parametrize("layout", sorted(LAYOUT_TASKS))
def test_regex_tables_give_the_reference_groups_on_every_full_size_tree(layout):
    """Every parameter of the full-size model (configs/cclm_base.py) and of each fine-tuning task's model: the
    default tables give the groups of the reference's substring rule on the official names of that model, and
    those of the rule as earlier versions applied it (the pre-training names, else the Flax path)."""
    cfg = _full_size_model()
    params = nn.meta.unbox(abstract_params(cfg, layout))
    task = LAYOUT_TASKS[layout]
    if task is None:
        config, new, no_decay_before = opt.default_optimizer_config(), NEW, NO_DECAY
    else:
        config, new = definitions.default_finetune_config(task).optimizer, definitions.TASK_HEADS[task]
        no_decay_before = NO_DECAY + ["LayerNorm.scale"]
    got = regex_groups(params, config)
    assert got == substring_groups(params, torch_names(cfg, layout), new, NO_DECAY)
    assert got == substring_groups(params, torch_names(cfg), new, no_decay_before)
    counts = {group: sum(g == group for g in got.values()) for group in set(got.values())}
    assert len(got) > 500 and len(counts) == (2 if task in ("retrieval",) else 4), counts


def test_groups_of_the_tiny_model(tiny):
    _, params = tiny
    groups = regex_groups(params, opt.default_optimizer_config())
    cases = {
        ("temp",): (True, 2.0),
        ("itm_head", "norm", "scale"): (True, 2.0),  # torch itm_head.1.weight: no "norm" in the name
        ("itm_head", "norm", "bias"): (False, 2.0),
        ("vision_encoder", "layers_0", "blocks_1", "attn", "relative_position_bias_table"): (False, 1.0),
        ("text_encoder", "layer_7", "crossattention", "self", "query", "kernel"): (True, 2.0),
        ("text_encoder", "layer_0", "attention", "self", "query", "kernel"): (True, 1.0),
        ("text_encoder", "layer_0", "attention", "output", "LayerNorm", "scale"): (False, 1.0),
        ("text_encoder", "embeddings", "word_embeddings"): (True, 1.0),
        ("vision_encoder", "layers_2", "blocks_0", "norm1", "scale"): (False, 1.0),
        ("mlm_head", "transform", "dense", "kernel"): (True, 1.0),
        ("vision_proj", "kernel"): (True, 2.0),
    }
    for path, expected in cases.items():
        assert groups[path] == expected, path
    counts = {}
    for decayed, mult in groups.values():
        counts[(mult, decayed)] = counts.get((mult, decayed), 0) + 1
    # Swin: 8 blocks x (4 decayed weights, 9 no-decay: 2 norms x 2, table, 4 biases) + 3 downsamples x (1, 2)
    # + patch_embed (1, 3) + final norm (0, 2) = (36, 83). Text: embeddings (3, 2) + 12 layers x (6, 10)
    # + MLM head (1, 4) = (76, 126). New (x2): 6 crossattention blocks x (4, 6) + temp (1, 0)
    # + 2 projections x (1, 1) + itm_head and bbox_head x (3, 3) = (33, 44).
    assert counts == {(1.0, True): 112, (1.0, False): 209, (2.0, True): 33, (2.0, False): 44}


def test_tables_first_match_wins_and_name_unmatched_patterns(tiny, caplog):
    _, params = tiny
    with_head = dict(params, cls_head={"fc1": {"kernel": np.zeros((4, 8)), "bias": np.zeros(8)},
                                       "norm": {"scale": np.ones(8), "bias": np.zeros(8)}})
    table = opt.head_lr_mults(("cls_head",), 5.0) + (("cls_head/fc1/kernel", 7.0), ("no_such/.*", 3.0))
    mult = _flat(opt.param_multipliers(with_head, table, "lr_mults"))
    assert mult[("cls_head", "fc1", "kernel")] == mult[("cls_head", "norm", "bias")] == 5.0  # the first match
    assert mult[("text_encoder", "layer_7", "crossattention", "self", "query", "kernel")] == 1.0  # no match
    assert "optimizer.lr_mults entry 'cls_head/fc1/kernel' matches no parameter" in caplog.text
    assert "'no_such/.*' matches no parameter" in caplog.text
    assert _flat(opt.param_multipliers(with_head, (("cls_head", 2.0),)))[("cls_head", "fc1", "bias")] == 1.0  # whole
    boxed = {"w": nn.Partitioned(np.zeros((2, 2)), names=("embed", "mlp"))}
    with pytest.raises(ValueError, match="unboxed"):
        opt.param_multipliers(boxed, ())


def test_schedule_values_under_jit():
    fn = jax.jit(opt.linear_warmup_linear_decay(1e-4, 2500, 83_160))
    for k in (0, 1, 1250, 2499, 2500, 40_000, 83_159, 83_160, 90_000):
        assert float(fn(jnp.int32(k))) == pytest.approx(1e-4 * np_lambda(k, 2500, 83_160), rel=2e-7,
                                                        abs=1e-15)  # measured 9.5e-8
    assert float(fn(jnp.int32(0))) == 0.0


def test_the_schedule_advances_once_per_cycle_of_updates():
    params = {"w": jnp.ones((3,))}
    scfg = ml_collections.ConfigDict({"kind": "linear", "warmup_steps": 4, "total_steps": 8})
    tx = opt.make_optimizer(opt.default_optimizer_config(), scfg, params, updates_per_schedule_step=3)
    state = tx.init(params)
    seen = []
    for _ in range(9):
        _, state = tx.update(params, state, params)
        seen.append(float(opt.learning_rate(state)))
    np.testing.assert_allclose(seen, [0.0] * 3 + [0.25e-4] * 3 + [0.5e-4] * 3, rtol=1e-6)
    with pytest.raises(ValueError, match="updates_per_schedule_step must be a positive integer, got 0"):
        opt.make_optimizer(opt.default_optimizer_config(), scfg, params, updates_per_schedule_step=0)
    assert opt.learning_rate(optax.sgd(0.1).init(params)) is None


def test_clipping_uses_torch_formula():
    clip = opt.clip_by_global_norm_torch(1e-6)
    grads = {"a": jnp.array([1.2e-6, 0.0]), "b": jnp.array([[1.6e-6]])}  # norm 2e-6
    clipped, _ = clip.update(grads, clip.init(grads))
    coef = 1e-6 / (2e-6 + 1e-6)  # torch: max_norm / (norm + 1e-6), not max_norm / norm
    for key in grads:
        np.testing.assert_allclose(clipped[key], np.asarray(grads[key]) * coef, rtol=3e-7)  # measured 1.4e-7
    small = {"a": jnp.array([0.3, 0.4])}  # norm 0.5 < 1: max_norm / (norm + 1e-6) > 1, clamped to 1
    unchanged, _ = opt.clip_by_global_norm_torch(1.0).update(small, optax.EmptyState())
    np.testing.assert_array_equal(unchanged["a"], small["a"])


def test_optax_adamw_decreases_a_quadratic_and_follows_its_formula():
    params = {"head": {"kernel": jnp.full((4, 3), 2.0), "bias": jnp.full((3,), -1.0)}, "temp": jnp.array(0.5)}
    target = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)
    ocfg = opt.default_optimizer_config()
    ocfg.update(name="optax_adamw", lr=0.1, clip_grad_norm=None, lr_mults=(("temp", 2.0),))
    scfg = ml_collections.ConfigDict({"kind": "linear", "warmup_steps": 0, "total_steps": 200})
    tx = opt.make_optimizer(ocfg, scfg, params)

    def loss(p):
        return 0.5 * sum(jnp.sum((x - t) ** 2) for x, t in zip(jax.tree.leaves(p), jax.tree.leaves(target)))

    @jax.jit
    def step(p, state):
        updates, state = tx.update(jax.grad(loss)(p), state, p)
        return optax.apply_updates(p, updates), state, updates

    p, state = params, tx.init(params)
    p, state, first = step(p, state)  # t=1: m̂/(sqrt(v̂)+eps) = g/(|g|+eps); lr(0) = 0.1 (no warm-up)
    g = jax.grad(loss)(params)
    groups = ((("head", "kernel"), 1.0, True), (("head", "bias"), 1.0, False), (("temp",), 2.0, True))
    for path, mult, decayed in groups:
        u, gg, pp = (_flat(t)[path] for t in (first, g, params))
        expected = -0.1 * mult * (gg / (np.abs(gg) + 1e-8) + (0.01 * pp if decayed else 0.0))
        np.testing.assert_allclose(u, expected, rtol=1.5e-6)  # measured 6.5e-7
    start = float(loss(params))
    for _ in range(2, 80):
        p, state, _ = step(p, state)
    assert float(loss(p)) < 0.01 * start


def test_state_is_arrays_only_and_round_trips_through_orbax(tmp_path):
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
    tx = opt.make_optimizer(opt.default_optimizer_config(), opt.default_schedule_config(), params)
    state = tx.init(params)
    _, state = jax.jit(lambda s: tx.update(params, s, params))(state)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "opt", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "opt", state)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("section, key, value, message", [
    ("optimizer", "lr", -1e-4, "optimizer.lr must be >= 0"),
    ("optimizer", "name", "adafactor", "optimizer.name 'adafactor' is not one of"),
    ("optimizer", "lr_mults", "cls_head", "optimizer.lr_mults must be a list of"),
    ("optimizer", "lr_mults", (("cls_head/.*", -1.0),), r"optimizer.lr_mults\[0\] must be a \(regex, multiplier"),
    ("optimizer", "wd_mults", (("(bias", 0.0),), r"optimizer.wd_mults\[0\] pattern '\(bias' is not a regular"),
    ("optimizer", "wd_mults", (("/temp", 0.0),), r"optimizer.wd_mults\[0\] pattern '/temp' starts with '/'"),
    ("optimizer", "b2", 1.0, r"optimizer.b2 must be in \[0, 1\)"),
    ("optimizer", "weight_deacy", 0.1, r"optimizer has unknown keys \['weight_deacy'\]"),
    ("optimizer", "new_param_patterns", ("cls_head",), "were replaced by the tables optimizer.lr_mults"),
    ("schedule", "warmup_steps", 100_000, "schedule.warmup_steps 100000 exceeds schedule.total_steps 83160"),
    ("schedule", "kind", "cosine", "schedule.kind 'cosine' is not one of"),
])
def test_validation_names_the_bad_field(section, key, value, message):
    defaults = {"optimizer": opt.default_optimizer_config(), "schedule": opt.default_schedule_config()}
    configs = {name: ml_collections.ConfigDict(dict(c.to_dict(), **({key: value} if name == section else {})))
               for name, c in defaults.items()}
    with pytest.raises(ValueError, match=message):
        opt.validate_optimizer_config(configs["optimizer"], configs["schedule"])
    opt.validate_optimizer_config(opt.default_optimizer_config(), opt.default_schedule_config())


# ------------------------------------------------------------------------------- states of earlier versions

class OldReferenceAdamWState(NamedTuple):
    """Frozen copy of the state earlier versions' `reference_adamw` held: an int32 count per parameter."""

    count: Any
    mu: Any
    nu: Any


def _old_layout(opt_state):
    """The optimizer state as earlier versions held the same moments: chain([clip,] reference_adamw)."""
    *clip, adam, _ = opt_state.inner_state
    old = OldReferenceAdamWState(count=jax.tree.map(lambda _: adam.count, adam.mu), mu=adam.mu, nu=adam.nu)
    return tuple(clip) + (old,)


@pytest.fixture(scope="module")
def trained():
    """(params, optimizer, abstract state, state after 3 updates with upc 2, update fn)."""
    params = {"enc": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "bias": jnp.full((3,), 0.5)},
              "temp": jnp.array(0.07)}
    scfg = ml_collections.ConfigDict({"kind": "linear", "warmup_steps": 2, "total_steps": 10})
    tx = opt.make_optimizer(opt.default_optimizer_config(), scfg, params, updates_per_schedule_step=2)

    @jax.jit
    def update(state):
        grads = jax.tree.map(lambda p: jnp.cos(3.0 * p + state.step), state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state)

    state = create_train_state(params, tx, jax.random.PRNGKey(0))
    for _ in range(3):
        state = update(state)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    return abstract, state, update


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("legacy_item, clip", [(False, True), (False, False), (True, True)])
def test_checkpoints_with_the_earlier_state_layout_resume_exactly(trained, tmp_path, legacy_item, clip):
    abstract, state, update = trained
    if not clip:  # the same run without clipping: no clip state in either layout
        drop_clip = lambda s: s.replace(opt_state=s.opt_state._replace(inner_state=s.opt_state.inner_state[1:]))  # noqa: E731
        abstract, state = drop_clip(abstract), drop_clip(state)
    old = _old_layout(state.opt_state)
    if legacy_item:  # the single `state` item of the earliest checkpoints
        legacy = LegacyTrainState(state.step, state.params, old, state.rng, state.nonfinite)
        manager = ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("state", "data"))
        manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(legacy), data=ocp.args.JsonSave({})))
        manager.wait_until_finished()
        manager.close()
    else:
        ckpt = Checkpointer(str(tmp_path), every=1, keep=3)
        ckpt.save(3, state.replace(opt_state=old), {}, force=True)
        ckpt.close()
    restored, _ = Checkpointer(str(tmp_path), every=1, keep=3).restore(
        abstract, upgrade_opt_state=opt.upgrade_legacy_state)
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)
    expected = state.opt_state._replace(hyperparams={"learning_rate": jnp.zeros((), jnp.float32)})
    _assert_same(restored.opt_state, expected)  # moments, Adam's count 3, the schedule's count 3
    if clip:  # the next update continues the run exactly (the schedule at 3 // 2, Adam's t = 4)
        _assert_same(update(restored).params, update(state).params)


def test_an_unknown_optimizer_state_is_one_line_saying_how_to_resume(trained, tmp_path):
    abstract, state, _ = trained
    ckpt = Checkpointer(str(tmp_path), every=1, keep=3)
    ckpt.save(3, state.replace(opt_state={"something": state.params}), {}, force=True)
    ckpt.close()
    with pytest.raises(OptimizerStateLayoutError, match=r"step 3 .* `cclm-jax export .* `cclm-jax import") as err:
        Checkpointer(str(tmp_path), every=1, keep=3).restore_newest_readable(
            abstract, upgrade_opt_state=opt.upgrade_legacy_state)
    assert "\n" not in str(err.value)
    assert (tmp_path / "checkpoints" / "3").is_dir()  # not moved aside as corrupt
    with pytest.raises(OptimizerStateLayoutError, match="another layout"):
        Checkpointer(str(tmp_path), every=1, keep=3).restore(abstract)


@pytest.mark.parametrize("task", [None, "xvnli", "xgqa", "retrieval"])
def test_run_configs_of_earlier_versions_resume(tmp_path, task):
    """config.json as earlier versions wrote it (substring lists) is the same run as the default tables."""
    if task is None:
        sys.path.insert(0, str(REPO / "configs"))
        import tiny  # noqa: PLC0415  (configs/tiny.py)

        config = tiny.get_config("micro")
        old = {"lr_mult": 2.0, "new_param_patterns": NEW, "no_decay_patterns": NO_DECAY}
    else:
        config = definitions.default_finetune_config(task)
        old = {"lr_mult": 2.0, "new_param_patterns": list(definitions.TASK_HEADS[task]),
               "no_decay_patterns": NO_DECAY + ["LayerNorm.scale"]}
    saved = json.loads(config.to_json_best_effort())
    for key in ("lr_mults", "wd_mults"):
        del saved["optimizer"][key]
    saved["optimizer"].update(old)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    run_directory.check_same_run(config, str(tmp_path))
    saved["optimizer"]["new_param_patterns"] = ["cls_head", "temp"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"differs in optimizer.lr_mult \(2.0 .*optimizer.new_param_patterns"):
        run_directory.check_same_run(config, str(tmp_path))
