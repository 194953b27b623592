"""The pure-PyTorch CCLM (cclm_jax.torch): golden parity, checkpoint layouts and loaders, Swin geometry."""
import ast
import fractions
import json
import re

import numpy as np
import pytest
from scipy.special import erf

torch = pytest.importorskip("torch")

from cclm_jax.torch import (  # noqa: E402
    CCLM,
    ConfigError,
    StateDictMismatchError,
    config_from_state_dict,
    from_state_dict,
    load,
    validate_config,
)
from cclm_jax.torch.swin import SwinBlock, SwinTransformer, relative_position_index, shifted_window_mask  # noqa: E402

TINY_CONFIG = {
    "vision": {"image_res": 224, "patch_size": 4, "embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8],
               "window_size": 7, "mlp_ratio": 4.0},
    "text": {"vocab_size": 1000, "hidden_size": 128, "num_heads": 4, "intermediate_size": 256, "num_layers": 12,
             "fusion_layer": 6, "max_position_embeddings": 514, "type_vocab_size": 1, "layer_norm_eps": 1e-5},
    "embed_dim": 32,
}
FULL_CONFIG = {
    "vision": {"image_res": 224, "patch_size": 4, "embed_dim": 128, "depths": [2, 2, 18, 2],
               "num_heads": [4, 8, 16, 32], "window_size": 7, "mlp_ratio": 4.0},
    "text": {"vocab_size": 250002, "hidden_size": 1024, "num_heads": 16, "intermediate_size": 4096, "num_layers": 12,
             "fusion_layer": 6, "max_position_embeddings": 514, "type_vocab_size": 1, "layer_norm_eps": 1e-5},
    "embed_dim": 256,
}
OUTPUT_NAMES = ("image_embeds", "text_embeds", "image_feat", "text_feat", "cross_embeds_pos", "itm_logits_pos",
                "mlm_logits_at_masked_pos")
TIED_COPIES = ("text_encoder.cls.predictions.decoder.weight", "text_encoder.cls.predictions.decoder.bias")
# Measured 0: on torch 2.13 CPU the port is bitwise equal to the official code. 1e-6 is ~2 float32 roundings at
# the outputs' scale (|x| <= 5.2), room for another BLAS build and nothing more.
ATOL = 1e-6


@pytest.fixture(scope="module")
def golden_ckpt(golden_dir):
    return torch.load(golden_dir / "ref_ckpt.th", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def golden_io(golden_dir):
    with np.load(golden_dir / "ref_outputs.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def golden_model(golden_dir):
    return load(golden_dir / "ref_ckpt.th", text_num_heads=4)


def run_outputs(model, io):
    """The golden fixture's seven outputs, computed by ``model`` from the fixture inputs."""
    t = {k: torch.from_numpy(io[k]) for k in ("image", "mm_text_ids", "mm_text_atts", "mm_text_ids_masked",
                                              "mm_masked_pos")}
    with torch.no_grad():
        image_embeds, image_atts = model.encode_image(t["image"])
        text_embeds = model.encode_text(t["mm_text_ids"], t["mm_text_atts"])
        image_feat, text_feat = model.features(image_embeds, text_embeds)
        cross = model.fuse(image_embeds, image_atts, text_embeds, t["mm_text_atts"])
        mlm = model.mlm_logits(t["mm_text_ids_masked"], t["mm_text_atts"], image_embeds, image_atts,
                               t["mm_masked_pos"])
        outputs = (image_embeds, text_embeds, image_feat, text_feat, cross, model.itm_logits(cross[:, 0]), mlm)
    return {name: out.numpy() for name, out in zip(OUTPUT_NAMES, outputs)}


def max_errors(outputs, io):
    return {name: float(np.abs(outputs[name] - io[name]).max()) for name in OUTPUT_NAMES}


@pytest.fixture(scope="module")
def golden_outputs(golden_model, golden_io):
    return run_outputs(golden_model, golden_io)


# ---------------------------------------------------------------------------------------------- golden parity
@pytest.mark.parametrize("name", OUTPUT_NAMES)
def test_golden_output_matches_reference(golden_outputs, golden_io, name):
    assert golden_outputs[name].shape == golden_io[name].shape
    np.testing.assert_allclose(golden_outputs[name], golden_io[name], rtol=0, atol=ATOL)


def test_contrastive_logits_and_itm_scores(golden_model, golden_outputs, golden_io):
    assert golden_model.temp.item() == pytest.approx(float(golden_io["temp"]))
    sims = golden_model.contrastive_logits(torch.from_numpy(golden_io["image_feat"]),
                                           torch.from_numpy(golden_io["text_feat"])).detach().numpy()
    np.testing.assert_allclose(sims, golden_io["image_feat"] @ golden_io["text_feat"].T / golden_io["temp"],
                               rtol=0, atol=1.5e-6)  # measured 7.2e-7 (|x| <= 3.7)
    logits = golden_io["itm_logits_pos"]
    expected = np.exp(logits[:, 1]) / np.exp(logits).sum(axis=1)
    scores = golden_model.itm_scores(torch.from_numpy(golden_outputs["cross_embeds_pos"][:, 0])).detach().numpy()
    np.testing.assert_allclose(scores, expected, rtol=0, atol=2e-7)  # measured 8.9e-8


def test_padding_does_not_change_real_tokens(golden_model, golden_io):
    """Self-attention: appended pad tokens are masked out; cross-attention: masked condition tokens are ignored."""
    ids = torch.from_numpy(golden_io["mm_text_ids"][:1])
    atts = torch.from_numpy(golden_io["mm_text_atts"][:1])
    padded_ids = torch.cat([ids, torch.full((1, 5), 7)], dim=1)
    padded_atts = torch.cat([atts, torch.zeros((1, 5), dtype=atts.dtype)], dim=1)
    cond = torch.from_numpy(golden_io["image_embeds"][:1])
    with torch.no_grad():
        plain = golden_model.encode_text(ids, atts)
        padded = golden_model.encode_text(padded_ids, padded_atts)
        fused_short = golden_model.fuse(cond[:, :20], torch.ones((1, 20), dtype=torch.long), plain, atts)
        cond_atts = torch.cat([torch.ones((1, 20)), torch.zeros((1, 30))], dim=1).long()
        fused_masked = golden_model.fuse(cond, cond_atts, plain, atts)
    np.testing.assert_allclose(padded[:, :40].numpy(), plain.numpy(), rtol=0, atol=ATOL)  # measured 0
    np.testing.assert_allclose(fused_masked.numpy(), fused_short.numpy(), rtol=0, atol=ATOL)  # measured 0


# ------------------------------------------------------------------------------------------ layout and config
def test_config_from_golden_state_dict(golden_ckpt):
    assert config_from_state_dict(golden_ckpt["model"], text_num_heads=4) == TINY_CONFIG


def test_built_buffers_and_key_order_equal_the_official_file(golden_ckpt):
    state = CCLM(TINY_CONFIG).state_dict()
    assert list(state) == list(golden_ckpt["model"])
    buffers = [k for k in state if k.endswith(("relative_position_index", "attn_mask", "position_ids"))]
    assert len(buffers) == 8 + 3 + 1
    for key in buffers:
        assert state[key].dtype == golden_ckpt["model"][key].dtype, key
        assert torch.equal(state[key], golden_ckpt["model"][key]), key


def test_full_size_layout_matches_official_keys(golden_dir):
    rows = (line.split("\t") for line in (golden_dir / "full_state_dict_keys.txt").read_text().splitlines())
    official = {key: ast.literal_eval(shape) for key, shape in rows}
    with torch.device("meta"):
        model = CCLM(FULL_CONFIG)
    state = model.state_dict()
    assert set(state) == set(official)
    assert {k: tuple(v.shape) for k, v in state.items()} == official
    assert sum(p.numel() for p in model.parameters()) == 525_677_393  # spec §1.7, tied decoder counted once
    meta_state = {k: torch.empty(shape, device="meta") for k, shape in official.items()}
    assert config_from_state_dict(meta_state) == FULL_CONFIG


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["vision"].pop("window_size"), "lacks field(s) ['window_size']"),
    (lambda c: c["text"].update(dropout=0.1), "unknown field(s) ['dropout']"),
    (lambda c: c["vision"].update(depths=[2, 2, 2]), "same length"),
    (lambda c: c["vision"].update(embed_dim=8, num_heads=[1, 1, 1, 1]), "must equal text.hidden_size 128"),
    (lambda c: c["vision"].update(image_res=256), "do not tile into windows of 7"),
    (lambda c: c["text"].update(num_heads=3), "'text.hidden_size' 128 is not divisible by 'text.num_heads' 3"),
    (lambda c: c.update(embed_dim=0), "'embed_dim': expected a positive int"),
], ids=["missing", "unknown", "stage_lists", "width", "tiling", "heads", "embed_dim"])
def test_bad_config_is_named(edit, message):
    config = json.loads(json.dumps(TINY_CONFIG))
    edit(config)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(config)


# ------------------------------------------------------------------------------------------ loading and errors
@pytest.mark.parametrize("edit, named", [
    (lambda sd: sd.update({"text_proj.weight": sd["text_proj.weight"][:16]}),
     r"1 shape mismatch\(es\): \['text_proj.weight \(16, 128\) != expected \(32, 128\)'\]"),
    (lambda sd: sd.pop("itm_head.3.bias"), r"1 missing key\(s\): \['itm_head.3.bias'\]"),
    (lambda sd: sd.update({"itm_head.4.weight": torch.zeros(2)}), r"1 unexpected key\(s\): \['itm_head.4.weight'\]"),
    (lambda sd: sd.update({TIED_COPIES[1]: torch.zeros(1000)}), r"tied tensors differ: \['" + TIED_COPIES[1]),
    (lambda sd: sd.update({"vision_encoder.layers.1.blocks.1.attn_mask": torch.zeros(16, 49, 49)}),
     r"buffer\(s\) differ .*\['vision_encoder.layers.1.blocks.1.attn_mask'\]"),
], ids=["shape", "missing", "unexpected", "untied", "stale_buffer"])
def test_bad_state_dict_is_named(golden_ckpt, tmp_path, edit, named):
    state_dict = dict(golden_ckpt["model"])
    edit(state_dict)
    with pytest.raises(StateDictMismatchError, match=named):
        from_state_dict(state_dict, TINY_CONFIG)
    path = tmp_path / "bad.th"
    torch.save({"model": state_dict, "config": TINY_CONFIG}, path)
    with pytest.raises(StateDictMismatchError, match=re.escape(f"{path}: ") + ".*" + named):
        load(path)


def test_absent_buffers_and_tied_copies_are_rebuilt(golden_ckpt, golden_io, tmp_path):
    buffers = ("relative_position_index", "attn_mask", "position_ids")
    state_dict = {k: v for k, v in golden_ckpt["model"].items() if not k.endswith(buffers) and k not in TIED_COPIES}
    assert len(state_dict) == len(golden_ckpt["model"]) - 12 - 2
    path = tmp_path / "bare.th"
    torch.save(state_dict, path)
    with pytest.raises(ConfigError, match="pass image_res"):
        load(path, text_num_heads=4)
    model = load(path, text_num_heads=4, image_res=224)
    errors = max_errors(run_outputs(model, golden_io), golden_io)
    assert max(errors.values()) < ATOL, errors


def test_safetensors_with_config_json(golden_ckpt, golden_io, tmp_path):
    from safetensors.torch import save_file

    state_dict = {k: v.contiguous() for k, v in golden_ckpt["model"].items() if k not in TIED_COPIES}
    save_file(state_dict, tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json must sit beside model.safetensors"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    model = load(tmp_path)
    assert model.config == TINY_CONFIG and not model.training
    errors = max_errors(run_outputs(model, golden_io), golden_io)
    assert max(errors.values()) < ATOL, errors


def test_pickled_objects_need_allow_pickle(golden_ckpt, tmp_path):
    path = tmp_path / "pickled.th"
    torch.save({"model": golden_ckpt["model"], "config": {"ratio": fractions.Fraction(1, 2)}}, path)
    with pytest.raises(ValueError, match="weights_only=True.*pass allow_pickle=True"):
        load(path, text_num_heads=4)
    with pytest.warns(UserWarning, match="can run arbitrary code"):
        model = load(path, text_num_heads=4, allow_pickle=True)
    assert torch.equal(model.itm_head[3].weight, golden_ckpt["model"]["itm_head.3.weight"])


def test_bad_inputs_are_named(golden_model):
    with pytest.raises(ValueError, match=r"image: expected shape \(B, 3, 224, 224\) \(NCHW\), got \(1, 224, 224, 3\)"):
        golden_model.encode_image(torch.zeros(1, 224, 224, 3))
    with pytest.raises(ValueError, match=r"text attention mask: expected shape \(2, 8\), got \(2, 7\)"):
        golden_model.encode_text(torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="600 tokens exceed max_position_embeddings 514"):
        golden_model.encode_text(torch.zeros(1, 600, dtype=torch.long), torch.ones(1, 600, dtype=torch.long))


# ------------------------------------------------------------------------------------------ Swin geometry
def test_relative_position_index_against_loops():
    window = 4
    got = relative_position_index(window).numpy()
    for i in range(window * window):
        for j in range(window * window):
            dy, dx = i // window - j // window, i % window - j % window
            assert got[i, j] == (dy + window - 1) * (2 * window - 1) + (dx + window - 1)


def rolled_geometry(resolution, window, shift):
    """Per token (row-major over the original grid): its window id and position inside the window after the
    roll by -shift, and whether each pair is a true neighbour (their offset survives the roll on both axes)."""
    rows, cols = np.divmod(np.arange(resolution * resolution), resolution)
    prow, pcol = (rows - shift) % resolution, (cols - shift) % resolution
    window_id = (prow // window) * (resolution // window) + pcol // window
    true_neighbours = (((rows[:, None] - rows[None]) == (prow[:, None] - prow[None]))
                       & ((cols[:, None] - cols[None]) == (pcol[:, None] - pcol[None])))
    return prow, pcol, window_id, true_neighbours


@pytest.mark.parametrize("resolution, window, shift", [(24, 12, 6), (56, 7, 3), (14, 7, 3)])
def test_shifted_window_mask_against_wraparound_rule(resolution, window, shift):
    mask = shifted_window_mask(resolution, window, shift).numpy()
    prow, pcol, window_id, true_neighbours = rolled_geometry(resolution, window, shift)
    for w in range(mask.shape[0]):
        members = np.flatnonzero(window_id == w)  # in original row-major order
        slot = (prow[members] % window) * window + pcol[members] % window
        members = members[np.argsort(slot)]  # in the window's row-major order
        expected = np.where(true_neighbours[np.ix_(members, members)], 0.0, -100.0)
        np.testing.assert_array_equal(mask[w], expected)


def _layer_norm(x, weight, bias):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * weight + bias


def _gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def test_shifted_swin_block_against_global_attention_reference():
    """A 384/12-style shifted block (24x24 tokens, window 12, shift 6) equals dense attention over all tokens
    restricted to the same shifted window, with the relative bias and -100 across the wrap-around seam."""
    resolution, window, shift, dim, heads = 24, 12, 6, 8, 2
    torch.manual_seed(0)
    block = SwinBlock(dim, heads, resolution, window, shift, mlp_ratio=2.0)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.5)
    x = torch.randn(1, resolution * resolution, dim)
    with torch.no_grad():
        got = block(x)[0].numpy()
    p = {k: v.numpy().astype(np.float64) for k, v in block.state_dict().items()}
    x = x[0].numpy().astype(np.float64)

    prow, pcol, window_id, true_neighbours = rolled_geometry(resolution, window, shift)
    dy = (prow % window)[:, None] - (prow % window)[None] + window - 1
    dx = (pcol % window)[:, None] - (pcol % window)[None] + window - 1
    bias = p["attn.relative_position_bias_table"][dy * (2 * window - 1) + dx]  # (N, N, heads)
    logit_offset = np.where(true_neighbours, 0.0, -100.0) + np.where(window_id[:, None] == window_id[None], 0.0,
                                                                      -np.inf)
    h = _layer_norm(x, p["norm1.weight"], p["norm1.bias"])
    q, k, v = np.split(h @ p["attn.qkv.weight"].T + p["attn.qkv.bias"], 3, axis=-1)
    head_dim = dim // heads
    out = np.zeros_like(h)
    for n in range(heads):
        cols = slice(n * head_dim, (n + 1) * head_dim)
        scores = q[:, cols] @ k[:, cols].T * head_dim ** -0.5 + bias[:, :, n] + logit_offset
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, cols] = weights / weights.sum(-1, keepdims=True) @ v[:, cols]
    y = x + out @ p["attn.proj.weight"].T + p["attn.proj.bias"]
    hidden = _gelu(_layer_norm(y, p["norm2.weight"], p["norm2.bias"]) @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"])
    expected = y + hidden @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=3e-6)  # float32 vs float64: measured 1.2e-6


def test_swin_at_384_with_window_12():
    vision = dict(TINY_CONFIG["vision"], image_res=384, window_size=12)
    encoder = SwinTransformer(vision)
    state = encoder.state_dict()
    assert [tuple(state[f"layers.{s}.blocks.1.attn_mask"].shape) for s in range(3)] == [(64, 144, 144),
                                                                                         (16, 144, 144),
                                                                                         (4, 144, 144)]
    assert "layers.3.blocks.1.attn_mask" not in state  # 12x12 tokens = one window: no shift
    assert tuple(state["layers.3.blocks.0.attn.relative_position_bias_table"].shape) == (23 * 23, 8)
    with torch.no_grad():
        out = encoder(torch.randn(2, 3, 384, 384))
    assert out.shape == (2, 145, 128)
    np.testing.assert_allclose(out[:, 0].numpy(), out[:, 1:].mean(1).numpy(), rtol=0, atol=ATOL)  # measured 0
