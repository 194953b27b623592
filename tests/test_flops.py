"""Analytic FLOPs (`cclm_jax.flops`) against published numbers, parameter counts and XLA's own counts."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from cclm_jax import flops, objectives
from cclm_jax.models import base_model_config, build_model, tiny_model_config

B = 4
SHAPES = {"image_caption": flops.TextShapes(16, 4), "parallel_text": flops.TextShapes(24, 6)}
LOSSES = {"image_caption": objectives.image_text_losses, "parallel_text": objectives.parallel_text_losses}


def test_base_model_per_example_counts_match_the_issue():
    cfg = base_model_config()
    assert flops.model_flops(cfg, "image_caption") / 1e9 == pytest.approx(248, rel=0.005)
    assert flops.model_flops(cfg, "parallel_text") / 1e9 == pytest.approx(276, rel=0.005)
    # The K/V cache saves 3 of 4 image K/V projections (4.6%) and 2 of 4 sentence ones (3.5%).
    for kind, saved in (("image_caption", 0.046), ("parallel_text", 0.035)):
        cached = flops.forward_flops(cfg, kind, cache_cross_kv=True) / flops.forward_flops(cfg, kind)
        assert cached == pytest.approx(1 - saved, abs=0.001)


def test_swin_b_matches_the_published_count():
    # Swin-B 224 px: 15.4 G multiply-adds (Liu et al. 2021, Table 1).
    assert flops.swin_flops(base_model_config().vision) / 2 / 1e9 == pytest.approx(15.4, rel=0.005)
    assert flops.vision_tokens(base_model_config().vision) == 50


def _abstract_params(cfg):
    model = build_model(cfg)
    ids = jnp.zeros((1, 8), jnp.int32)
    res = cfg.vision.image_res
    return model, nn.meta.unbox(jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((1, res, res, 3)), ids, ids)["params"], jax.random.PRNGKey(0)))


def _kernel_size(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
               if path[-1].key == "kernel")


def test_dense_flops_per_token_are_twice_the_kernel_parameters():
    cfg = base_model_config()
    _, params = _abstract_params(cfg)
    layers = params["text_encoder"]
    t, d = cfg.text, cfg.text.hidden_size
    attention_one_token = flops.attention_scores_values(1, 1, d)
    assert flops.text_layer_flops(t, 1) - attention_one_token == 2 * _kernel_size(layers["layer_0"])
    cross = flops.fusion_layer_flops(t, 1, 1, d) - 2 * attention_one_token
    assert cross == 2 * _kernel_size(layers["layer_6"])
    assert flops.cross_kv_flops(t, 1, d) == 2 * _kernel_size(
        {k: v for k, v in layers["layer_6"]["crossattention"]["self"].items() if k in ("key", "value")})


def _abstract_batch(kind, cfg):
    s = SHAPES[kind]
    ids = jax.ShapeDtypeStruct((B, s.tokens), jnp.int32)
    masks = jax.ShapeDtypeStruct((B, s.masks), jnp.int32)
    batch = {"text_ids": ids, "text_atts": ids, "text_ids_masked": ids, "masked_pos": masks, "masked_ids": masks}
    if kind == "image_caption":
        res = cfg.vision.image_res
        batch["image"] = jax.ShapeDtypeStruct((B, res, res, 3), jnp.float32)
    else:
        batch.update(text_ids_2=ids, text_atts_2=ids)
    return batch


def narrow_config():
    """The tiny model with a one-stage 32 px Swin and 2 + 2 text layers: quick to trace, every kind of layer."""
    cfg = tiny_model_config()
    cfg.vision.update(image_res=32, window_size=4, embed_dim=128, depths=(2,), num_heads=(4,))
    cfg.text.update(num_layers=4, fusion_layer=2)
    return cfg


def _lowered_losses(kind, cfg):
    model, params = _abstract_params(cfg)

    def total(p, batch):
        losses = LOSSES[kind](model, p, batch, jax.random.PRNGKey(0))
        return sum(v for k, v in losses.items() if k != "negatives")

    return cfg, jax.jit(total).lower(params, _abstract_batch(kind, cfg))


@pytest.mark.parametrize("cache_cross_kv", [False, True])
@pytest.mark.parametrize("kind", flops.KINDS)
def test_analytic_count_equals_the_matmuls_in_the_lowered_program(kind, cache_cross_kv):
    cfg = narrow_config()
    cfg.cache_cross_kv = cache_cross_kv
    cfg, lowered = _lowered_losses(kind, cfg)
    counted = flops.stablehlo_matmul_flops(lowered.as_text())
    # Left out of the analytic count: contrastive logits (B x B x E) and the two sampling similarities.
    contrastive = 3 * 2 * B * B * cfg.embed_dim
    assert counted == B * flops.forward_flops(cfg, kind, SHAPES[kind], cache_cross_kv) + contrastive


def test_compiled_cost_analysis_agrees_within_tolerance():
    """Tiny model, image–caption losses. XLA's compiled count adds elementwise ops (LayerNorm, softmax, GELU:
    +6% with the tiny 16-channel Swin, +3% for sentence pairs) and deduplicates identical K/V projections (-);
    the analytic count must lie within -5% / +20% of it."""
    kind = "image_caption"
    cfg, lowered = _lowered_losses(kind, tiny_model_config())
    xla = lowered.compile().cost_analysis()["flops"]
    analytic = B * flops.forward_flops(cfg, kind, SHAPES[kind])
    assert 0.95 <= xla / analytic <= 1.20, (xla, analytic)


def test_stablehlo_counter_follows_calls_and_convolutions():
    inner = jax.jit(lambda a, b: a @ b)  # lowered as a private function, called three times

    def f(a, b, image, kernel):
        conv = jax.lax.conv_general_dilated(image, kernel, (2, 2), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return inner(a, b), 2 * inner(a, b), inner(b.T, a.T), conv

    text = jax.jit(f).lower(jnp.ones((3, 5)), jnp.ones((5, 7)), jnp.ones((1, 8, 8, 3)),
                            jnp.ones((2, 2, 3, 4))).as_text()
    assert text.count("call @") == 3
    conv_out, conv_window = 4 * 4 * 4, 2 * 2 * 3
    assert flops.stablehlo_matmul_flops(text) == 3 * (2 * 3 * 5 * 7) + 2 * conv_out * conv_window


def test_describe_reads_the_data_shapes_and_rejects_unknown_kinds():
    config = ml_collections.ConfigDict({
        "model": base_model_config(),
        "data": {"image_caption": {"max_tokens": 40, "max_masks": 12},
                 "parallel_text": {"max_tokens": 64, "max_masks": 20}}})
    text = flops.describe(config)
    assert "image_caption: 248.3 GFLOPs/example" in text and "parallel_text: 275.8 GFLOPs/example" in text
    with pytest.raises(ValueError, match="batch kind must be one of"):
        flops.forward_flops(base_model_config(), "video")
