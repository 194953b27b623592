"""The reference AdamW, parameter groups and schedule against an independent numpy implementation.

The numpy reference below is written from the formulas of transformers-4.12.5 AdamW, torch LambdaLR and
torch.nn.utils.clip_grad_norm_ (CCLM_SPEC §4.1), in float64, without calling cclm_jax.optimizer.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from cclm_jax import optimizer as opt
from cclm_jax.interop.layout import torch_names
from cclm_jax.interop.shapes import param_shapes
from cclm_jax.models import tiny_model_config

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
    cfg, params = tiny
    names = torch_names(cfg)
    ocfg = opt.default_optimizer_config()
    ocfg.update(lr=0.05, weight_decay=0.1)  # large, so decay order and lr x2 are visible at 1e-6
    scfg = ml_collections.ConfigDict({"kind": "linear", "warmup_steps": 2, "total_steps": 6})
    tx = opt.make_optimizer(ocfg, scfg, params, cfg)
    ref = NumpyAdamW(_flat(params), names, 0.05, 2, 6, 0.9, 0.98, 1e-8, 0.1, 1.0)

    @jax.jit
    def step(p, state, g, k):
        updates, state = tx.update(g, state, p, schedule_step=k)
        return optax.apply_updates(p, updates), state

    rng = np.random.default_rng(1)
    n = sum(x.size for x in jax.tree.leaves(params))
    # scheduler steps: lr 0 (k=0), warm-up (k=1), decay (k=3, 5), past the end (k=7 -> 0); norms > and < 1
    schedule = [(0, 3.0), (1, 0.5), (3, 3.0), (5, 0.5), (7, 3.0)]
    p, state = params, tx.init(params)
    for k, norm in schedule:
        grads = {path: (norm / math.sqrt(n)) * rng.standard_normal(x.shape).astype(np.float32)
                 for path, x in _flat(params).items()}
        for small in (("temp",), ("itm_head", "fc2", "bias")):  # |g| ~ eps: eps placement matters
            grads[small] = grads[small] * np.float32(1e-5)
        tree = jax.tree_util.tree_unflatten(jax.tree.structure(params),
                                            [grads[path] for path in _flat(params)])
        before = _flat(p)
        p, state = step(p, state, tree, jnp.int32(k))
        ref.update(grads, k)
        got = _flat(p)
        worst = max(float(np.max(np.abs(got[key] - ref.p[key]))) for key in got)
        assert worst < 1e-6, (k, worst)  # measured 5.5e-7 (k=5 and 7)
        if k == 0:  # LambdaLR starts at factor 0: no change at all
            assert all(np.array_equal(got[key], before[key]) for key in got)
    adam_state = state[1]
    assert set(int(c) for c in jax.tree.leaves(adam_state.count)) == {len(schedule)}
    for moments, expected in ((adam_state.mu, ref.m), (adam_state.nu, ref.v)):
        for key, got in _flat(moments).items():  # float32 sums of mixed-sign terms: error relative to the leaf
            np.testing.assert_allclose(got, expected[key], rtol=6e-7,  # measured 2.7e-7 (rtol = atol scale)
                                       atol=6e-7 * np.max(np.abs(expected[key])))


def test_param_groups_of_the_tiny_model(tiny):
    cfg, params = tiny
    decay, mult = opt.param_groups(params, cfg)
    decay, mult = _flat(decay), _flat(mult)
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
        assert (bool(decay[path]), float(mult[path])) == expected, path
    counts = {}
    for path in decay:
        group = (float(mult[path]), bool(decay[path]))
        counts[group] = counts.get(group, 0) + 1
    # Swin: 8 blocks x (4 decayed weights, 9 no-decay: 2 norms x 2, table, 4 biases) + 3 downsamples x (1, 2)
    # + patch_embed (1, 3) + final norm (0, 2) = (36, 83). Text: embeddings (3, 2) + 12 layers x (6, 10)
    # + MLM head (1, 4) = (76, 126). New (x2): 6 crossattention blocks x (4, 6) + temp (1, 0)
    # + 2 projections x (1, 1) + itm_head and bbox_head x (3, 3) = (33, 44).
    assert counts == {(1.0, True): 112, (1.0, False): 209, (2.0, True): 33, (2.0, False): 44}


def test_param_groups_fall_back_to_flax_paths_for_unnamed_heads(tiny):
    cfg, params = tiny
    with_head = dict(params, cls_head={"fc1": {"kernel": np.zeros((4, 8)), "bias": np.zeros(8)},
                                       "norm": {"scale": np.ones(8), "bias": np.zeros(8)}})
    decay, mult = opt.param_groups(with_head, cfg, new_param_patterns=("cls_head",), lr_mult=5.0)
    decay, mult = _flat(decay), _flat(mult)
    assert (decay[("cls_head", "fc1", "kernel")], mult[("cls_head", "fc1", "kernel")]) == (True, 5.0)
    assert (decay[("cls_head", "fc1", "bias")], mult[("cls_head", "fc1", "bias")]) == (False, 5.0)
    assert decay[("cls_head", "norm", "scale")]  # like the reference's cls_head.1.weight
    assert mult[("text_encoder", "layer_7", "crossattention", "self", "query", "kernel")] == 1.0
    boxed = {"w": nn.Partitioned(np.zeros((2, 2)), names=("embed", "mlp"))}
    with pytest.raises(ValueError, match="unboxed"):
        opt.param_groups(boxed, cfg)


def test_schedule_values_under_jit():
    fn = jax.jit(opt.linear_warmup_linear_decay(1e-4, 2500, 83_160))
    for k in (0, 1, 1250, 2499, 2500, 40_000, 83_159, 83_160, 90_000):
        assert float(fn(jnp.int32(k))) == pytest.approx(1e-4 * np_lambda(k, 2500, 83_160), rel=2e-7,
                                                        abs=1e-15)  # measured 9.5e-8
    assert float(fn(jnp.int32(0))) == 0.0


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


def test_active_mask_leaves_parameters_without_gradient_untouched():
    params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([0.5, 0.25])}
    groups = ({"a": True, "b": True}, {"a": 1.0, "b": 1.0})
    tx = optax.chain(opt.clip_by_global_norm_torch(1.0),
                     opt.reference_adamw(lambda k: 0.1 + 0.0 * k, 0.9, 0.98, 1e-8, 0.01, *groups))
    state = tx.init(params)
    grads = {"a": jnp.array([0.3, 0.4]), "b": jnp.array([300.0, 400.0])}
    updates, state = tx.update(grads, state, params, schedule_step=jnp.int32(1),
                               active={"a": jnp.array(True), "b": jnp.array(False)})
    np.testing.assert_array_equal(updates["b"], 0.0)
    np.testing.assert_array_equal(state[1].mu["b"], 0.0)
    assert (int(state[1].count["a"]), int(state[1].count["b"])) == (1, 0)
    # "b" is out of the clipping norm (0.5 < 1: "a" unclipped): first Adam step on a is lr*g/(|g|+eps)
    p1 = params["a"] - 0.1 * grads["a"] / (jnp.abs(grads["a"]) + 1e-8)
    np.testing.assert_allclose(params["a"] + updates["a"], p1 - 0.1 * 0.01 * p1, rtol=3e-7)  # measured 1.3e-7


def test_optax_adamw_decreases_a_quadratic_and_follows_its_formula(tiny):
    cfg, _ = tiny
    params = {"head": {"kernel": jnp.full((4, 3), 2.0), "bias": jnp.full((3,), -1.0)}, "temp": jnp.array(0.5)}
    target = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)
    ocfg = opt.default_optimizer_config()
    ocfg.update(name="optax_adamw", lr=0.1, clip_grad_norm=None, new_param_patterns=("temp",))
    scfg = ml_collections.ConfigDict({"kind": "linear", "warmup_steps": 5, "total_steps": 200})
    tx = opt.make_optimizer(ocfg, scfg, params, cfg)

    def loss(p):
        return 0.5 * sum(jnp.sum((x - t) ** 2) for x, t in zip(jax.tree.leaves(p), jax.tree.leaves(target)))

    @jax.jit
    def step(p, state, k):
        updates, state = tx.update(jax.grad(loss)(p), state, p, schedule_step=k)
        return optax.apply_updates(p, updates), state, updates

    p, state = params, tx.init(params)
    p, state, first = step(p, state, jnp.int32(1))  # t=1: m̂/(sqrt(v̂)+eps) = g/(|g|+eps); lr(1) = 0.1/5
    g = jax.grad(loss)(params)
    groups = ((("head", "kernel"), 1.0, True), (("head", "bias"), 1.0, False), (("temp",), 2.0, True))
    for path, mult, decayed in groups:
        u, gg, pp = (_flat(t)[path] for t in (first, g, params))
        expected = -0.02 * mult * (gg / (np.abs(gg) + 1e-8) + (0.01 * pp if decayed else 0.0))
        np.testing.assert_allclose(u, expected, rtol=1.5e-6)  # measured 6.5e-7
    start = float(loss(params))
    for k in range(2, 80):
        p, state, _ = step(p, state, jnp.int32(k))
    assert float(loss(p)) < 0.01 * start
    with pytest.raises(ValueError, match="active"):
        tx.update(g, state, p, schedule_step=jnp.int32(0), active={"head": True, "temp": True})


def test_state_is_arrays_only_and_round_trips_through_orbax(tmp_path):
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
    tx = opt.make_optimizer(opt.default_optimizer_config(), opt.default_schedule_config(), params,
                            tiny_model_config())
    state = tx.init(params)
    _, state = jax.jit(lambda s: tx.update(params, s, params, schedule_step=jnp.int32(3)))(state)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "opt", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "opt", state)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


def test_update_without_schedule_step_is_a_clear_error():
    params = {"w": jnp.ones((2,))}
    tx = opt.make_optimizer(opt.default_optimizer_config(), opt.default_schedule_config(), params,
                            tiny_model_config())
    with pytest.raises(ValueError, match="schedule_step"):
        tx.update(params, tx.init(params), params)


@pytest.mark.parametrize("section, key, value, message", [
    ("optimizer", "lr", -1e-4, "optimizer.lr must be >= 0"),
    ("optimizer", "name", "adafactor", "optimizer.name 'adafactor' is not one of"),
    ("optimizer", "new_param_patterns", "cls_head", "optimizer.new_param_patterns must be a list"),
    ("optimizer", "b2", 1.0, r"optimizer.b2 must be in \[0, 1\)"),
    ("optimizer", "weight_deacy", 0.1, r"optimizer has unknown keys \['weight_deacy'\]"),
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
