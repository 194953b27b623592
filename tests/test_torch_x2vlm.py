"""The pure-PyTorch CCLM-X2VLM (cclm_jax.torch.X2VLM): the official X2-VLM golden outputs (skipped without
../shared), parity with the JAX X2VLM through both exports (runs everywhere), family detection and errors."""
import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cclm_jax.torch import (  # noqa: E402
    CCLM,
    X2VLM,
    ConfigError,
    StateDictMismatchError,
    config_from_state_dict,
    from_state_dict,
    load,
    state_dict_family,
    validate_config,
)
from tests.conftest import SHARED  # noqa: E402

GOLDEN_X2VLM = SHARED / "reference" / "golden_x2vlm"
TINY_X2VLM = {
    "vision": {"kind": "vit", "image_res": 224, "patch_size": 16, "embed_dim": 128, "depth": 2, "num_heads": 2,
               "mlp_ratio": 4.0, "layer_norm_eps": 1e-6, "qkv_bias": "qv", "rel_pos_bias": True, "pos_grid": 0,
               "layer_scale_init": 0.1, "pool": "mean"},
    "text": {"vocab_size": 1000, "hidden_size": 128, "num_heads": 4, "intermediate_size": 256, "num_layers": 4,
             "fusion_layer": 4, "max_position_embeddings": 514, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
             "pad_token_id": 1},
    "cross": {"num_layers": 2, "num_heads": 4, "intermediate_size": 256, "layer_norm_eps": 1e-12},
    "embed_dim": 32,
}
# Measured max |torch - official| on torch 2.13 CPU: embeddings / cross states / MLM logits <= 1.4e-6 (values up
# to 4.5), features, ITM logits (all 3B matching rows too) <= 3.6e-7, bbox 6e-8; the contrastive logits (divided
# by temp = 0.08, values up to 12) 2.9e-6. Not bitwise as the CCLM golden is (this reference ran elsewhere); the
# JAX port's errors are 1.4e-6 / 5.5e-6. Tolerances ~2x the largest measured.
ATOL, ATOL_OVER_TEMP = 3e-6, 6e-6


def _golden_path():
    if not (GOLDEN_X2VLM / "ref_ckpt.th").exists():
        pytest.skip("../shared/reference/golden_x2vlm is absent")
    return GOLDEN_X2VLM / "ref_ckpt.th"


@pytest.fixture(scope="module")
def golden_ckpt():
    return torch.load(_golden_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def golden_io():
    _golden_path()
    with np.load(GOLDEN_X2VLM / "ref_outputs.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def golden_model():
    return load(_golden_path())  # text heads: width 128 / 32 = 4, as the fixture


def _matching_rows(model, cond, cond_atts, text, text_atts, negs):
    """ITM logits of X2-VLM's ``get_matching_loss`` rows with the recorded negatives: B positives, then
    [negative condition of text b, text b], then [condition b, negative text of condition b]."""
    b = cond.shape[0]
    neg_cond, neg_text = negs[:b], negs[b:]
    conds = torch.cat([cond, cond[neg_cond], cond])
    cond_masks = torch.cat([cond_atts, cond_atts[neg_cond], cond_atts])
    texts = torch.cat([text, text, text[neg_text]])
    text_masks = torch.cat([text_atts, text_atts, text_atts[neg_text]])
    return model.itm_logits(model.fuse(conds, cond_masks, texts, text_masks)[:, 0])


def golden_outputs(model, io):
    """Every output of ref_outputs.npz, computed by ``model`` from the fixture inputs (README conventions)."""
    t = {k: torch.from_numpy(v) for k, v in io.items()}
    out = {}
    with torch.no_grad():
        atts = t["img_text_atts"]
        embeds, image_atts = model.encode_image(t["img_image"])
        text = model.encode_text(t["img_text_ids"], atts)
        feat_i, feat_t = model.features(embeds, text)
        cross = model.fuse(embeds, image_atts, text, atts)
        out.update(img_image_embeds=embeds, img_text_embeds=text, img_image_feat=feat_i, img_text_feat=feat_t,
                   img_itc_logits_i2t=model.contrastive_logits(feat_i, feat_t), img_cross_embeds_pos=cross,
                   img_itm_logits_pos=model.itm_logits(cross[:, 0]),
                   img_itm_logits_all=_matching_rows(model, embeds, image_atts, text, atts, t["img_negs_t2i_then_i2t"]),
                   img_mlm_logits_at_masked_pos=model.mlm_logits(t["img_text_ids_masked"], atts, embeds, image_atts,
                                                                 t["img_masked_pos"]))

        atts, region_atts = t["reg_text_atts"], t["reg_image_atts"]
        images = t["reg_image"][t["reg_idx_to_group_img"]]
        embeds, _ = model.encode_image(images, region_atts[:, 1:])
        full, ones = model.encode_image(images)
        text = model.encode_text(t["reg_text_ids"], atts)
        feat_i, feat_t = model.features(embeds, text)
        cross = model.fuse(embeds, region_atts, text, atts)
        out.update(reg_image_embeds=embeds, reg_image_embeds_fullatts=full, reg_text_embeds=text,
                   reg_image_feat=feat_i, reg_text_feat=feat_t, reg_cross_embeds_pos=cross,
                   reg_itm_logits_pos=model.itm_logits(cross[:, 0]),
                   reg_itm_logits_all=_matching_rows(model, embeds, region_atts, text, atts,
                                                     t["reg_negs_t2i_then_i2t"]),
                   reg_mlm_logits_at_masked_pos=model.mlm_logits(t["reg_text_ids_masked"], atts, embeds, region_atts,
                                                                 t["reg_masked_pos"]),
                   reg_output_coord=model.bbox(model.fuse(full, ones, text, atts)[:, 0]))

        atts1, atts2 = t["para_text_atts"], t["para_text_atts_2"]
        text1, text2 = model.encode_text(t["para_text_ids"], atts1), model.encode_text(t["para_text_ids_2"], atts2)
        feat1, feat2 = model.text_features(text1), model.text_features(text2)
        cross = model.fuse(text1, atts1, text2, atts2)  # sentence 1 plays the image
        out.update(para_text_embeds=text1, para_text_embeds_2=text2, para_text_feat=feat1, para_text_feat_2=feat2,
                   para_ttc_logits=model.contrastive_logits(feat1, feat2), para_cross_embeds_pos=cross,
                   para_ttm_logits_pos=model.itm_logits(cross[:, 0]),
                   para_ttm_logits_all=_matching_rows(model, text1, atts1, text2, atts2, t["para_negs_t2i_then_i2t"]),
                   para_mlm_logits_at_masked_pos=model.mlm_logits(t["para_text_ids_masked"], atts1, text2, atts2,
                                                                  t["para_masked_pos"]),
                   temp=model.temp.detach())
    return {name: value.numpy() for name, value in out.items()}


GOLDEN_NAMES = tuple(f"{step}_{name}" for step, names in (
    ("img", ("image_embeds", "text_embeds", "image_feat", "text_feat", "itc_logits_i2t", "cross_embeds_pos",
             "itm_logits_pos", "itm_logits_all", "mlm_logits_at_masked_pos")),
    ("reg", ("image_embeds", "image_embeds_fullatts", "text_embeds", "image_feat", "text_feat", "cross_embeds_pos",
             "itm_logits_pos", "itm_logits_all", "mlm_logits_at_masked_pos", "output_coord")),
    ("para", ("text_embeds", "text_embeds_2", "text_feat", "text_feat_2", "ttc_logits", "cross_embeds_pos",
              "ttm_logits_pos", "ttm_logits_all", "mlm_logits_at_masked_pos"))) for name in names) + ("temp",)


@pytest.fixture(scope="module")
def golden_results(golden_model, golden_io):
    return golden_outputs(golden_model, golden_io)


# ---------------------------------------------------------------------------------------------- golden parity
def test_every_recorded_output_is_compared(golden_io):
    """Everything in ref_outputs.npz but the inputs and the recorded negatives is in GOLDEN_NAMES."""
    step_inputs = ("text_ids", "text_atts", "text_ids_masked", "masked_pos", "masked_ids")
    inputs = {f"{step}_{name}" for step in ("img", "reg", "para") for name in step_inputs}
    inputs |= {f"para_{name}_2" for name in step_inputs} | {"img_image", "reg_image", "reg_idx_to_group_img",
                                                           "reg_image_atts", "reg_target_bbox", "reg_is_image"}
    negatives = {f"{step}_negs_t2i_then_i2t" for step in ("img", "reg", "para")}
    assert set(golden_io) - inputs - negatives == set(GOLDEN_NAMES)


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_output_matches_reference(golden_results, golden_io, name):
    assert golden_results[name].shape == golden_io[name].shape
    atol = ATOL_OVER_TEMP if name.endswith(("itc_logits_i2t", "ttc_logits")) else ATOL
    np.testing.assert_allclose(golden_results[name], golden_io[name], rtol=0, atol=atol)


def test_golden_file_is_an_x2vlm_with_the_official_layout(golden_ckpt, golden_model):
    assert state_dict_family(golden_ckpt["model"]) == "x2vlm"
    assert isinstance(golden_model, X2VLM) and not golden_model.training
    assert config_from_state_dict(golden_ckpt["model"]) == TINY_X2VLM
    assert golden_model.config == TINY_X2VLM
    state = X2VLM(TINY_X2VLM).state_dict()
    rows = [line.split("\t") for line in (GOLDEN_X2VLM / "ref_ckpt_keys.txt").read_text().splitlines() if line]
    assert list(state) == [key for key, _, _ in rows] == list(golden_ckpt["model"])
    for key, shape, dtype in rows:
        assert str(tuple(state[key].shape)) == shape and str(state[key].dtype) == f"torch.{dtype}", key
    buffers = [k for k in state if k.endswith(("relative_position_index", "position_ids"))]
    assert len(buffers) == 2 + 1
    for key in buffers:
        assert torch.equal(state[key], golden_ckpt["model"][key]), key
    decoder = golden_model.mlm_head.predictions.decoder
    assert decoder.bias is golden_model.mlm_head.predictions.bias
    assert decoder.weight is not golden_model.text_encoder.embeddings.word_embeddings.weight  # untied


def test_padding_does_not_change_real_tokens(golden_model, golden_io):
    """RoBERTa positions: appended pads neither shift the real tokens' positions nor are attended to."""
    ids, atts = torch.from_numpy(golden_io["img_text_ids"][:1]), torch.from_numpy(golden_io["img_text_atts"][:1])
    padded_ids = torch.cat([ids, torch.ones((1, 5), dtype=ids.dtype)], dim=1)
    padded_atts = torch.cat([atts, torch.zeros((1, 5), dtype=atts.dtype)], dim=1)
    image = torch.from_numpy(golden_io["img_image_embeds"][:1])
    ones = torch.ones(image.shape[:2], dtype=torch.long)
    with torch.no_grad():
        plain, padded = golden_model.encode_text(ids, atts), golden_model.encode_text(padded_ids, padded_atts)
        fused = golden_model.fuse(image, ones, plain, atts)
        fused_padded = golden_model.fuse(image, ones, padded, padded_atts)
    np.testing.assert_allclose(padded[:, :30].numpy(), plain.numpy(), rtol=0, atol=1e-6)  # measured 0
    np.testing.assert_allclose(fused_padded[:, :30].numpy(), fused.numpy(), rtol=0, atol=1e-6)  # measured 0


def test_bad_inputs_are_named(golden_model):
    with pytest.raises(ValueError, match=r"image: expected shape \(B, 3, 224, 224\) \(NCHW\), got \(1, 224, 224, 3\)"):
        golden_model.encode_image(torch.zeros(1, 224, 224, 3))
    with pytest.raises(ValueError, match=r"patch_weights: expected shape \(1, 196\), got \(1, 197\)"):
        golden_model.encode_image(torch.zeros(1, 3, 224, 224), torch.ones(1, 197))
    with pytest.raises(ValueError, match="513 tokens exceed the 512 positions"):
        golden_model.encode_text(torch.zeros(1, 513, dtype=torch.long), torch.ones(1, 513, dtype=torch.long))
    with pytest.raises(ValueError, match=r"condition attention mask: expected shape \(1, 197\), got \(1, 196\)"):
        golden_model.fuse(torch.zeros(1, 197, 128), torch.ones(1, 196), torch.zeros(1, 4, 128), torch.ones(1, 4))


# ------------------------------------------------------------------------------------- errors and family choice
def test_unrecognised_state_dict_is_one_line(tmp_path):
    state_dict = {"encoder.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)}
    expected = ("state_dict is neither a CCLM pre-training state_dict (no "
                "'text_encoder.bert.embeddings.word_embeddings.weight') nor a CCLM-X2VLM one (no 'cross_encoder.*' "
                "keys); its first keys: ['encoder.weight', 'head.bias']")
    with pytest.raises(ConfigError) as error:
        from_state_dict(state_dict)
    assert str(error.value) == expected
    path = tmp_path / "other.th"
    torch.save({"model": state_dict}, path)
    with pytest.raises(ConfigError) as error:
        load(path)
    assert str(error.value) == f"{path}: {expected}" and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"looks like a fine-tuned CCLM: retrieval / XVNLI / NLVR / VQA"):
        config_from_state_dict({"text_encoder.embeddings.word_embeddings.weight": torch.zeros(4, 2)})


@pytest.mark.parametrize("edit, named", [
    (lambda sd: sd.pop("cross_encoder.encoder.layer.1.output.dense.bias"),
     r"CCLM-X2VLM config: 1 missing key\(s\): \['cross_encoder.encoder.layer.1.output.dense.bias'\]"),
    (lambda sd: sd.update({"mlm_head.predictions.decoder.bias": torch.zeros(1000)}),
     r"tied tensors differ: \['mlm_head.predictions.decoder.bias'\] must equal \['mlm_head.predictions.bias'\]"),
    (lambda sd: sd.update({"vision_encoder.blocks.1.attn.relative_position_index": torch.zeros(197, 197).long()}),
     r"buffer\(s\) differ .*vision.image_res / vision.patch_size.*blocks.1.attn.relative_position_index"),
    (lambda sd: sd.update({"text_proj.weight": sd["text_proj.weight"][:16]}),
     r"1 shape mismatch\(es\): \['text_proj.weight \(16, 128\) != expected \(32, 128\)'\]"),
], ids=["missing", "untied", "stale_buffer", "shape"])
def test_bad_x2vlm_state_dict_is_named(golden_ckpt, edit, named):
    state_dict = dict(golden_ckpt["model"])
    edit(state_dict)
    with pytest.raises(StateDictMismatchError, match=named):
        from_state_dict(state_dict, TINY_X2VLM)


def test_absent_buffers_and_tied_copy_are_rebuilt(golden_ckpt, golden_io):
    dropped = ("relative_position_index", "position_ids", "mlm_head.predictions.decoder.bias")
    state_dict = {k: v for k, v in golden_ckpt["model"].items() if not k.endswith(dropped)}
    assert len(state_dict) == len(golden_ckpt["model"]) - 4
    results = golden_outputs(from_state_dict(state_dict), golden_io)
    np.testing.assert_allclose(results["img_mlm_logits_at_masked_pos"], golden_io["img_mlm_logits_at_masked_pos"],
                               rtol=0, atol=ATOL)


def test_a_cclm_config_with_an_x2vlm_state_dict_is_named(golden_ckpt):
    cclm_config = {"vision": {"image_res": 224, "patch_size": 4, "embed_dim": 16, "depths": [2, 2, 2, 2],
                              "num_heads": [1, 2, 4, 8], "window_size": 7, "mlp_ratio": 4.0},
                   "text": dict(TINY_X2VLM["text"], num_layers=12, fusion_layer=6), "embed_dim": 32}
    del cclm_config["text"]["pad_token_id"]
    with pytest.raises(StateDictMismatchError, match=r"does not fit the CCLM config: \d+ missing key\(s\)"):
        from_state_dict(golden_ckpt["model"], cclm_config)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["vision"].update(kind="swin"), "'vision.kind': CCLM-X2VLM takes a ViT ('vit'), got 'swin'"),
    (lambda c: c["vision"].update(pool="max"), "'vision.pool': expected one of ['mean', 'cls'], got 'max'"),
    (lambda c: c["cross"].pop("layer_norm_eps"), "section 'cross' lacks field(s) ['layer_norm_eps']"),
    (lambda c: c["text"].update(fusion_layer=2), "'text.fusion_layer' 2 must equal text.num_layers 4"),
    (lambda c: c["cross"].update(num_heads=3), "'text.hidden_size' 128 is not divisible by 'cross.num_heads' 3"),
    (lambda c: c["vision"].update(embed_dim=64), "'vision.embed_dim' 64 must equal text.hidden_size 128"),
    (lambda c: c["vision"].update(rel_pos_bias=1), "'vision.rel_pos_bias': expected true or false, got 1"),
], ids=["kind", "pool", "cross_field", "fusion", "cross_heads", "width", "flag"])
def test_bad_x2vlm_config_is_named(edit, message):
    config = json.loads(json.dumps(TINY_X2VLM))
    edit(config)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(config)


# ------------------------------------------------------------------- parity with the JAX X2VLM (runs everywhere)
def _micro_config(variant):
    """A CCLM-X2VLM smaller than the golden one: 32 px, patch 8 (4x4 grid), width 32; 'dinov2' swaps in the
    DINOv2 tower (q/k/v biases, a stored 5x5 position grid resized to 4x4, layer scale 1, CLS pooling)."""
    from cclm_jax.models import vit_vision_config, x2vlm_model_config

    cfg = x2vlm_model_config("tiny")
    cfg.vision = vit_vision_config(variant, "small")
    cfg.vision.update(image_res=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)
    if variant == "dinov2":
        cfg.vision.pos_grid = 5
    cfg.text.update(vocab_size=64, hidden_size=32, num_heads=2, intermediate_size=64, num_layers=2, fusion_layer=2,
                    max_position_embeddings=40, mask_token_id=63, hidden_dropout=0.0, attention_dropout=0.0)
    cfg.cross.update(num_layers=2, num_heads=4, intermediate_size=48)
    cfg.embed_dim = 16
    return cfg


def _random_params(cfg, seed):
    """Random numpy parameters of the JAX X2VLM (nothing compiled): LayerNorm scales near 1, biases and
    relative-position tables large enough to matter."""
    import jax

    from cclm_jax.interop.shapes import param_shapes

    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = path[-1].key
        if name == "temp":
            return np.full(shape, 0.07, np.float32)
        if name == "scale":
            return (1.0 + 0.2 * rng.normal(size=shape)).astype(np.float32)
        std = 1.0 if name == "relative_position_bias_table" else 0.2
        return (std * rng.normal(size=shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def _micro_inputs(cfg, seed):
    rng = np.random.default_rng(seed)
    b, length, grid = 3, 9, cfg.vision.image_res // cfg.vision.patch_size
    ids = rng.integers(3, cfg.text.vocab_size - 1, size=(b, length))
    ids[:, 0], atts = 0, np.ones((b, length), np.int64)
    for row, real in enumerate((9, 6, 4)):  # <s> ... </s> <pad>...
        ids[row, real - 1], ids[row, real:], atts[row, real:] = 2, 1, 0
    ids_masked = np.where(rng.random(ids.shape) < 0.3, cfg.text.mask_token_id, ids) * atts + (1 - atts)
    region = np.zeros((b, 1 + grid * grid), np.int64)
    region[:, 0] = 1
    region[:, 1:] = rng.random((b, grid * grid)) < 0.5
    region[:, 1] = 1  # at least one patch
    return {"image": rng.normal(size=(b, 3, cfg.vision.image_res, cfg.vision.image_res)).astype(np.float32),
            "ids": ids, "atts": atts, "ids_masked": ids_masked, "masked_pos": np.array([[1, 2], [3, 0], [2, 1]]),
            "region_atts": region, "other": np.array([2, 0, 1])}  # the parallel-text view: another sentence


def _outputs(call, x, region_pooling):
    """The same outputs from the JAX (``call(method, *args)``) or torch model."""
    out = {}
    embeds, image_atts = call("encode_image", x["image"])
    text = call("encode_text", x["ids"], x["atts"])
    cross = call("fuse", embeds, image_atts, text, x["atts"])
    out.update(image_embeds=embeds, text_embeds=text, features=call("features", embeds, text), cross=cross,
               itm=call("itm_logits", cross[:, 0]), bbox=call("bbox", cross[:, 0]),
               mlm=call("mlm_logits", x["ids_masked"], x["atts"], embeds, image_atts, x["masked_pos"]),
               para=call("fuse", text[x["other"]], x["atts"][x["other"]], text, x["atts"]))  # text as condition
    if region_pooling:
        region, _ = call("encode_image", x["image"], x["region_atts"][:, 1:])
        out.update(region=region, region_cross=call("fuse", region, x["region_atts"], text, x["atts"]))
    return out


@pytest.fixture(scope="module", params=["beit2", "dinov2"])
def jax_x2vlm(request, tmp_path_factory):
    """(variant, JAX outputs, export dir, official-layout .th, inputs) of a random micro X2VLM."""
    import jax

    from cclm_jax.interop import official
    from cclm_jax.interop.export import export_safetensors
    from cclm_jax.models import build_model

    variant = request.param
    cfg = _micro_config(variant)
    params = _random_params(cfg, seed=len(variant))
    model = build_model(cfg)
    x = _micro_inputs(cfg, seed=3)

    def run(p, x):
        def call(method, *args):
            return model.apply({"params": p}, *args, method=getattr(model, method))

        return _outputs(call, x, variant == "beit2")

    outputs = jax.tree.map(np.asarray, jax.jit(run)(params, x))
    out = tmp_path_factory.mktemp(variant)
    export_safetensors(out / "export", cfg, params)
    official.save(out / "x2vlm.th", cfg, params)
    return variant, outputs, out / "export", out / "x2vlm.th", x


def _torch_outputs(model, x, region_pooling):
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        out = _outputs(lambda method, *args: getattr(model, method)(*args), t, region_pooling)
    return {k: tuple(o.numpy() for o in v) if isinstance(v, tuple) else v.numpy() for k, v in out.items()}


# Measured max |torch - JAX| (float32, values up to 4.9), both exports alike: beit2 2.6e-6 (cross states; image
# and region tokens 1.9e-6), dinov2 2.7e-6 (cross states; MLM logits 2.3e-6); ~2x that.
JAX_ATOL = 5e-6


@pytest.mark.parametrize("kind", ["export_dir", "official_th"])
def test_torch_x2vlm_equals_the_jax_model(jax_x2vlm, kind):
    variant, expected, export_dir, th_path, x = jax_x2vlm
    model = load(export_dir if kind == "export_dir" else th_path)
    if kind == "official_th":  # official.save records the architecture under config['architecture']
        with pytest.raises(ConfigError, match="records 2 text attention heads, but text_num_heads=3 was given"):
            load(th_path, text_num_heads=3)
    assert isinstance(model, X2VLM) and not model.training
    assert model.config["vision"]["pool"] == ("mean" if variant == "beit2" else "cls")
    assert model.config["text"]["num_heads"] == 2 and model.config["cross"]["num_heads"] == 4  # recorded, not guessed
    got = _torch_outputs(model, x, variant == "beit2")
    assert set(got) == set(expected)
    for name, value in got.items():
        for g, e in zip(value if isinstance(value, tuple) else (value,),
                        expected[name] if isinstance(expected[name], tuple) else (expected[name],)):
            assert g.shape == e.shape, name
            np.testing.assert_allclose(g, e, rtol=0, atol=JAX_ATOL, err_msg=f"{variant} {kind} {name}")


def test_cclm_checkpoints_still_build_a_cclm(golden_dir):
    model = load(golden_dir / "ref_ckpt.th", text_num_heads=4)
    assert type(model) is CCLM
