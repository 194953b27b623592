"""The Flax model with the official golden checkpoint reproduces the official PyTorch outputs."""
import functools

import jax
import numpy as np
import pytest

# Max |Flax - official PyTorch| per output, float32 on CPU: about twice the measured error (in the comment),
# so a drift of a few float32 roundings fails.
ATOL = {
    "image_embeds": 6e-6,  # measured 3.0e-6 (|x| <= 4.3)
    "text_embeds": 5e-6,  # 2.1e-6 (|x| <= 5.1)
    "image_feat": 4e-7,  # 1.8e-7
    "text_feat": 6e-7,  # 2.5e-7
    "cross_embeds_pos": 8e-6,  # 3.1e-6 (|x| <= 5.2)
    "itm_logits_pos": 6e-7,  # 2.7e-7
    "mlm_logits_at_masked_pos": 1.5e-6,  # 5.4e-7
}


def _all_outputs(model, params, image, ids, atts, ids_masked, masked_pos):
    v = {"params": params}
    image_embeds, image_atts = model.apply(v, image, method=model.encode_image)
    text_embeds = model.apply(v, ids, atts, method=model.encode_text)
    image_feat, text_feat = model.apply(v, image_embeds, text_embeds, method=model.features)
    cross = model.apply(v, image_embeds, image_atts, text_embeds, atts, method=model.fuse)
    return {
        "image_embeds": image_embeds, "image_atts": image_atts, "text_embeds": text_embeds,
        "image_feat": image_feat, "text_feat": text_feat, "cross_embeds_pos": cross,
        "itm_logits_pos": model.apply(v, cross[:, 0], method=model.itm_logits),
        "mlm_logits_at_masked_pos": model.apply(
            v, ids_masked, atts, image_embeds, image_atts, masked_pos, method=model.mlm_logits),
    }


@pytest.fixture(scope="module")
def outputs(golden_model):
    _, params, model, ref = golden_model
    fn = jax.jit(functools.partial(_all_outputs, model))
    return fn(params, ref["image"], ref["mm_text_ids"], ref["mm_text_atts"], ref["mm_text_ids_masked"],
              ref["mm_masked_pos"])


@pytest.mark.parametrize("name", list(ATOL))
def test_matches_official_outputs(outputs, golden_model, name):
    ref = golden_model[3]
    got = np.asarray(outputs[name])
    assert got.shape == ref[name].shape
    np.testing.assert_allclose(got, ref[name], rtol=0, atol=ATOL[name])


def test_image_layouts_agree(golden_model, outputs):
    """NCHW (PyTorch) and NHWC images give the same embeddings."""
    _, params, model, ref = golden_model
    nhwc = np.transpose(ref["image"], (0, 2, 3, 1))
    embeds, atts = model.apply({"params": params}, nhwc, method=model.encode_image)
    np.testing.assert_allclose(np.asarray(embeds), np.asarray(outputs["image_embeds"]), rtol=0,
                               atol=4e-6)  # measured 1.9e-6
    assert embeds.shape == (4, 50, 128) and np.all(np.asarray(atts) == 1)


def test_temperature_is_clamped(golden_model):
    _, params, model, ref = golden_model
    assert float(model.apply({"params": params}, method=model.temperature)) == pytest.approx(float(ref["temp"]))
    for raw, clamped in [(5.0, 0.5), (1e-5, 0.001), (0.2, 0.2)]:
        p = dict(params, temp=np.float32(raw))
        assert float(model.apply({"params": p}, method=model.temperature)) == pytest.approx(clamped)


def test_import_infers_golden_architecture(golden_model):
    cfg = golden_model[0]
    assert tuple(cfg.vision.depths) == (2, 2, 2, 2) and tuple(cfg.vision.num_heads) == (1, 2, 4, 8)
    assert (cfg.vision.embed_dim, cfg.vision.window_size, cfg.vision.image_res) == (16, 7, 224)
    assert (cfg.text.vocab_size, cfg.text.hidden_size, cfg.text.num_layers, cfg.text.fusion_layer) == (1000, 128, 12, 6)
    assert (cfg.text.intermediate_size, cfg.text.num_heads, cfg.embed_dim) == (256, 4, 32)
