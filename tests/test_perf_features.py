"""Performance switches keep the numbers: cached cross K/V, fused attention, bfloat16, MLM memory, prefetch."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

from cclm_jax import objectives
from cclm_jax.models import build_model, tiny_model_config

B, L, M, VOCAB = 4, 12, 3, 100
LOSSES = {"image_caption": objectives.image_text_losses, "parallel_text": objectives.parallel_text_losses}


def micro_config(**overrides):
    """Every structural feature (shifted windows, fusion layers, tied MLM decoder) at the smallest sizes; two
    text + two fusion layers and a 4-block Swin stage, so that `scan_layers` runs real scans everywhere."""
    cfg = tiny_model_config()
    cfg.vision.update(image_res=32, window_size=4, embed_dim=64, depths=(4,), num_heads=(2,))
    cfg.text.update(vocab_size=VOCAB, hidden_size=64, num_heads=4, intermediate_size=128, num_layers=4,
                    fusion_layer=2, mask_token_id=VOCAB - 1)
    cfg.embed_dim = 16
    cfg.update(overrides)
    return cfg


def init_params(cfg, seed=0):
    model = build_model(cfg)
    ids = jnp.zeros((1, 8), jnp.int32)
    image = jnp.zeros((1, cfg.vision.image_res, cfg.vision.image_res, 3))
    return jax.jit(lambda k: nn.meta.unbox(model.init(k, image, ids, ids)["params"]))(jax.random.PRNGKey(seed))


def make_batch(kind, seed=0):
    r = np.random.RandomState(seed)
    atts = (np.arange(L)[None, :] < r.randint(M + 2, L + 1, (B, 1))).astype(np.int32)
    batch = {"text_ids": r.randint(3, VOCAB - 1, (B, L)), "text_atts": atts,
             "text_ids_masked": r.randint(3, VOCAB, (B, L)),
             "masked_pos": np.tile(np.arange(1, M + 1), (B, 1)), "masked_ids": r.randint(3, VOCAB - 1, (B, M))}
    batch["masked_ids"][0, -1] = objectives.IGNORE
    if kind == "image_caption":
        batch["image"] = r.randn(B, 32, 32, 3).astype(np.float32)
    else:
        batch.update(text_ids_2=r.randint(3, VOCAB - 1, (B, L)), text_atts_2=np.ones((B, L), np.int32))
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def params():
    return init_params(micro_config())


def summed_losses(cfg, kind):
    """params -> (sum of one view's losses, the losses dict) on a fixed batch and key."""
    model = build_model(cfg)

    def total(p):
        losses = LOSSES[kind](model, p, make_batch(kind), jax.random.PRNGKey(3))
        losses.pop("negatives")
        return sum(losses.values()), losses

    return total


def losses_and_grads_fn(cfg, kind):
    """Jitted params -> (losses dict, grads)."""
    grad_fn = jax.jit(jax.value_and_grad(summed_losses(cfg, kind), has_aux=True))

    def run(p):
        (_, losses), grads = grad_fn(p)
        return losses, grads

    return run


@pytest.fixture(scope="module")
def reference(params):
    """Plain layer loop, float32, no cache: sentence-pair (losses, grads), computed once for the module."""
    return losses_and_grads_fn(micro_config(), "parallel_text")(params)


def model_outputs(cfg, params, deterministic=True):
    model = build_model(cfg, deterministic=deterministic)
    batch = make_batch("image_caption")
    rngs = None if deterministic else {"dropout": jax.random.PRNGKey(7)}
    return jax.jit(lambda p: model.apply({"params": p}, batch["image"], batch["text_ids"], batch["text_atts"],
                                         rngs=rngs))(params)


@pytest.fixture(scope="module")
def reference_outputs(params):
    """The model's own forward (Swin, text encoder, fusion and MLM over image tokens), plain loop, einsums."""
    return model_outputs(micro_config(), params)


def assert_trees_close(a, b, rtol):
    flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    scale = max(float(jnp.max(jnp.abs(x))) for x in flat_a)
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol * scale)


def test_cached_kv_scan_and_remat_keep_sentence_pair_losses_and_gradients(params, reference):
    """K/V of sentence 1 reused by the 3 TTM passes (gathered for the negatives), scanned alongside the stacked
    layer parameters, rematerialised."""
    base_losses, base_grads = reference
    cfg = micro_config(cache_cross_kv=True, scan_layers=True, remat=True)
    losses, grads = losses_and_grads_fn(cfg, "parallel_text")(params)
    assert set(losses) == set(base_losses) == {"ttc", "ttm", "mlm"}
    for name in losses:  # measured 0; 2e-7 is one or two float32 roundings
        np.testing.assert_allclose(losses[name], base_losses[name], rtol=2e-7)
    assert_trees_close(grads, base_grads, 2e-7)  # measured 8.2e-8 of the largest gradient


def test_cached_image_kv_and_scans_keep_image_caption_losses(params):
    base = jax.jit(summed_losses(micro_config(), "image_caption"))(params)[1]
    cached = jax.jit(summed_losses(micro_config(cache_cross_kv=True, scan_layers=True), "image_caption"))(params)[1]
    assert set(cached) == {"itc", "itm", "mlm"}
    for name in cached:  # measured 0
        np.testing.assert_allclose(cached[name], base[name], rtol=2e-7)


def test_cached_cross_kv_has_one_pair_per_fusion_layer(params):
    model = build_model(micro_config())
    kv = model.apply({"params": params}, jnp.ones((B, 5, 64)), method=model.cross_kv)
    assert len(kv) == 2 and all(k.shape == v.shape == (B, 5, 4, 16) for k, v in kv)
    with pytest.raises(ValueError, match="cached cross keys/values for 4 layers, the model has 2"):
        model.apply({"params": params}, kv + kv, jnp.ones((B, 5), jnp.int32), jnp.ones((B, L, 64)),
                    jnp.ones((B, L), jnp.int32), method=model.fuse)


def test_scanned_layers_match_the_layer_loop(params, reference_outputs):
    assert {"layer_0", "layer_3"} <= set(params["text_encoder"])  # the per-layer parameter trees
    assert "blocks_3" in params["vision_encoder"]["layers_0"]
    # Scanned Swin block pairs and raw (uncached) conditions inside the text scans.
    assert_trees_close(model_outputs(micro_config(scan_layers=True), params), reference_outputs, 2e-7)  # measured 0
    # Training mode: per-block drop-path rates and dropout keys travel through the scans.
    dropped = model_outputs(micro_config(scan_layers=True, remat=True), params, deterministic=False)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(dropped))


def test_scanned_swin_pairs_train_in_bfloat16(params):
    """Traced per-block drop-path rates (float32) must not promote a bfloat16 residual stream: the scan carry
    keeps its dtype (cclm_base failed to trace on the first GPU run). The same keys draw the same masks in
    float32 and bfloat16, so the two differ by rounding only."""
    expected = model_outputs(micro_config(scan_layers=True), params, deterministic=False)
    got = model_outputs(micro_config(dtype="bfloat16", scan_layers=True), params, deterministic=False)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    assert_trees_close(got, expected, 1e-2)  # measured: 6e-3 of the largest output


def test_dot_product_attention_matches_the_explicit_path(params, reference_outputs):
    got = model_outputs(micro_config(attention_impl="dot_product"), params)
    assert_trees_close(got, reference_outputs, 2e-7)  # measured 0


def test_dot_product_attention_falls_back_while_attention_dropout_is_active(params):
    # Attention dropout needs the probabilities, which jax.nn.dot_product_attention does not expose: the
    # explicit path runs, so both settings draw the same masks and agree exactly.
    expected = model_outputs(micro_config(), params, deterministic=False)
    got = model_outputs(micro_config(attention_impl="dot_product"), params, deterministic=False)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), got, expected))


def test_bfloat16_compute_trains_with_float32_parameters(params, reference):
    losses_and_grads = losses_and_grads_fn(micro_config(dtype="bfloat16", cache_cross_kv=True), "parallel_text")
    losses, grads = losses_and_grads(params)
    f32_losses, f32_grads = reference
    for name in losses:
        assert losses[name].dtype == jnp.float32
        assert float(losses[name]) == pytest.approx(float(f32_losses[name]), rel=6e-3)  # measured 2.6e-3
    assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    cosine = optax.tree.vdot(grads, f32_grads) / (optax.tree.norm(grads) * optax.tree.norm(f32_grads))
    assert float(cosine) > 0.99
    stepped = jax.tree.map(lambda p, g: p - 0.05 * g / optax.tree.norm(grads), params, grads)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(stepped))
    assert sum(losses_and_grads(stepped)[0].values()) < sum(losses.values())


def test_mlm_loss_never_holds_full_vocabulary_logits_for_every_token():
    """Batch 128 x 12 masks x 250,002 vocabulary: logits exist only at the masked positions (the check runs on
    a narrow text stack so it compiles quickly; the vocabulary dimension is the full one)."""
    b, length, masks, vocab = 128, 40, 12, 250002
    cfg = micro_config()
    cfg.text.update(vocab_size=vocab, mask_token_id=vocab - 1)
    model = build_model(cfg)
    ids = jnp.zeros((1, 8), jnp.int32)
    abstract = nn.meta.unbox(jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), ids, ids)["params"], jax.random.PRNGKey(0)))
    tokens = jax.ShapeDtypeStruct((b, length), jnp.int32)
    positions = jax.ShapeDtypeStruct((b, masks), jnp.int32)
    cond = jax.ShapeDtypeStruct((b, 5, cfg.text.hidden_size), jnp.float32)

    def temp_bytes(chunk):
        def loss(p, ids_masked, atts, cond_embeds, pos, labels):
            ctx = objectives.Context(model, p, None, "global", chunk)
            cond_atts = jnp.ones(cond_embeds.shape[:2], jnp.int32)
            hidden = ctx("mlm_hidden", ids_masked, atts, cond_embeds, cond_atts, pos)
            return objectives.masked_token_loss(ctx, hidden, labels)

        compiled = jax.jit(jax.grad(loss)).lower(abstract, tokens, tokens, cond, positions, positions).compile()
        assert f"{b},{length},{vocab}]" not in compiled.as_text()
        return compiled.memory_analysis().temp_size_in_bytes

    full_vocab_logits = b * length * vocab * 4
    masked_logits = b * masks * vocab * 4
    unchunked = temp_bytes(0)
    assert unchunked < 2.5 * masked_logits < full_vocab_logits  # the logits and their gradient
    assert temp_bytes(128) < masked_logits / 3  # 128 positions at a time, recomputed in the backward pass


@pytest.mark.parametrize("field,value,message", [
    ("attention_impl", "flash", "model.attention_impl 'flash' is not one of"),
    ("cache_cross_kv", "yes", "model.cache_cross_kv must be True or False"),
    ("scan_layers", 1, "model.scan_layers must be True or False"),
])
def test_invalid_switches_are_rejected(field, value, message):
    raw = micro_config().to_dict()
    raw[field] = value
    with pytest.raises(ValueError, match=message):
        build_model(ml_collections.ConfigDict(raw))
