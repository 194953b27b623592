"""Model structure: parameter counts, config validation, Swin geometry helpers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cclm_jax.interop.shapes import param_shapes
from cclm_jax.models import base_model_config, build_model, swin, tiny_model_config


def _count(tree):
    return sum(int(np.prod(s)) for s in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, tuple)))


def test_base_model_has_official_parameter_count():
    shapes = param_shapes(base_model_config())
    per_module = {k: _count(v) for k, v in shapes.items()}
    assert per_module["vision_encoder"] == 86_743_224
    assert per_module["text_encoder"] + per_module["mlm_head"] == 434_190_482
    assert per_module["text_proj"] + per_module["vision_proj"] == 524_800
    assert per_module["itm_head"] == 2_107_394 and per_module["bbox_head"] == 2_111_492
    assert sum(per_module.values()) == 525_677_393


def test_base_model_lowers_full_forward():
    """The full-size model traces and lowers (abstract inputs; nothing allocated)."""
    cfg = base_model_config()
    model = build_model(cfg)
    params = nn.meta.unbox(jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 8), jnp.int32),
        jnp.ones((1, 8), jnp.int32))["params"])
    image = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((2, 40), jnp.int32)
    fn = jax.jit(lambda p, im, i, a: model.apply({"params": p}, im, i, a))
    out = jax.eval_shape(fn, params, image, ids, ids)
    assert out["image_feat"].shape == (2, 256) and out["itm_logits"].shape == (2, 2)
    assert out["mlm_logits"].shape == (2, 1, 250002)
    lowered = fn.lower(params, image, ids, ids)
    assert lowered.out_info["image_feat"].shape == (2, 256)


@pytest.mark.parametrize("field,value,message", [
    ("vision.embed_dim", 32, "must equal model.text.hidden_size"),
    ("vision.image_res", 200, "divisible by patch_size"),
    ("text.fusion_layer", 12, "fusion_layer"),
    ("text.num_heads", 3, "not divisible by num_heads"),
    ("dtype", "float8", "model.dtype"),
    ("text.pool", "max", "model.text.pool must be 'cls' or 'mean'"),
])
def test_invalid_model_config_is_rejected_before_building(field, value, message):
    cfg = tiny_model_config()
    node, *rest = field.split(".")
    if rest:
        cfg[node][rest[0]] = value
    else:
        cfg[node] = value
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_relative_position_index_matches_definition():
    w = 3
    idx = swin.relative_position_index(w)
    coords = [(i, j) for i in range(w) for j in range(w)]
    for a, (ya, xa) in enumerate(coords):
        for b, (yb, xb) in enumerate(coords):
            assert idx[a, b] == (ya - yb + w - 1) * (2 * w - 1) + (xa - xb + w - 1)


def test_shift_mask_blocks_only_cross_region_pairs():
    res, w, s = 8, 4, 2
    mask = swin.shifted_window_mask(res, w, s)
    assert mask.shape == ((res // w) ** 2, w * w, w * w)
    assert set(np.unique(mask)) == {0.0, -100.0}
    assert np.all(mask[0] == 0)  # the top-left window holds a single region
    assert np.all(mask[:, np.arange(w * w), np.arange(w * w)] == 0)  # a token always sees itself


def test_stage_without_shift_when_resolution_fits_window():
    assert swin.stage_geometry(7, 7) == (7, False)
    assert swin.stage_geometry(12, 12) == (12, False)
    assert swin.stage_geometry(56, 7) == (7, True)
    assert swin.stage_geometry(4, 7) == (4, False)


def test_dropout_is_active_only_when_not_deterministic(tiny_params):
    cfg, params = tiny_params
    ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    atts = jnp.ones_like(ids)
    model, train_model = build_model(cfg), build_model(cfg, deterministic=False)
    encode = jax.jit(lambda p: model.apply({"params": p}, ids, atts, method=model.encode_text))
    det = np.asarray(encode(params))
    np.testing.assert_array_equal(det, np.asarray(encode(params)))
    noisy = jax.jit(lambda p, key: train_model.apply(
        {"params": p}, ids, atts, method=train_model.encode_text, rngs={"dropout": key}))
    a, b = np.asarray(noisy(params, jax.random.PRNGKey(1))), np.asarray(noisy(params, jax.random.PRNGKey(2)))
    assert not np.allclose(a, det) and not np.allclose(a, b)


def test_mean_pooled_text_puts_the_sentence_mean_in_the_cls_slot(tiny_params):
    """text.pool='mean': position 0 of the text states is the masked mean of the 'cls' model's states (padding
    left out), every other position unchanged; the ITC text feature is its projection."""
    cfg, params = tiny_params
    ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) + 5
    atts = jnp.array([[1] * 8, [1] * 5 + [0] * 3], jnp.int32)
    mean_cfg = cfg.copy_and_resolve_references()
    mean_cfg.text.pool = "mean"
    cls_model, mean_model = build_model(cfg), build_model(mean_cfg)
    cls_states = np.asarray(cls_model.apply({"params": params}, ids, atts, method=cls_model.encode_text))
    mean_states = np.asarray(mean_model.apply({"params": params}, ids, atts, method=mean_model.encode_text))
    np.testing.assert_array_equal(mean_states[:, 1:], cls_states[:, 1:])
    expected = [cls_states[0].mean(0), cls_states[1, :5].mean(0)]
    np.testing.assert_allclose(mean_states[:, 0], np.stack(expected), rtol=1e-6, atol=1e-6)  # measured 2e-7
    assert not np.allclose(mean_states[:, 0], cls_states[:, 0])
