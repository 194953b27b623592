"""Official CCLM .th import/export: bitwise round trips, key lists, and errors for bad checkpoints."""
import ast

import jax
import numpy as np
import pytest
import torch

from cclm_jax.interop import official
from cclm_jax.interop.official import CheckpointError
from cclm_jax.interop.shapes import official_shapes, param_shapes
from cclm_jax.models import base_model_config, tiny_model_config

WORDS = "text_encoder.bert.embeddings.word_embeddings.weight"
DECODER = "text_encoder.cls.predictions.decoder.weight"
LAYER3_OUT = "text_encoder.bert.encoder.layer.3.output.dense.weight"


def random_params(model_config, seed=0):
    """Float32 numpy parameters of the model's shapes (no model.init: fast and allocation-light)."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: rng.standard_normal(s, dtype=np.float32), param_shapes(model_config),
                          is_leaf=lambda x: isinstance(x, tuple))
    params["temp"] = np.asarray(model_config.temp, np.float32)
    return params


def tiny_config():
    """The tiny config with temp exactly representable in float32 (it is read back from the file)."""
    cfg = tiny_model_config()
    cfg.temp = float(np.float32(cfg.temp))
    return cfg


def read_key_list(path):
    """[(key, shape, dtype or None)] from a golden key list (tab-separated)."""
    out = []
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        out.append((fields[0], tuple(ast.literal_eval(fields[1])), fields[2] if len(fields) > 2 else None))
    return out


def assert_trees_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert np.array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8)), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    return cfg, random_params(cfg)


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.th"
    official.save(path, *tiny)
    return path


@pytest.fixture(scope="module")
def golden_state_dict(golden_dir):
    return torch.load(golden_dir / "ref_ckpt.th", map_location="cpu", weights_only=True)["model"]


def test_th_to_jax_to_th_is_bitwise_and_key_for_key(golden_dir, golden_state_dict, tmp_path):
    cfg, params = official.load(golden_dir / "ref_ckpt.th", text_num_heads=4)
    exported = official.state_dict_from_params(cfg, params)
    expected = read_key_list(golden_dir / "tiny_state_dict_keys.txt")
    assert [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in exported.items()] == expected
    assert list(golden_state_dict) == list(exported)
    for key, ref in golden_state_dict.items():
        assert exported[key].dtype == ref.dtype and torch.equal(exported[key], ref), key
    official.save(tmp_path / "again.th", cfg, params)
    saved = torch.load(tmp_path / "again.th", weights_only=True)
    assert saved["model"][WORDS].data_ptr() == saved["model"][DECODER].data_ptr()  # tied: stored once
    assert saved["config"]["architecture"]["text"]["num_heads"] == 4


def test_jax_to_th_to_jax_is_bitwise(tiny, tiny_file):
    cfg, params = tiny
    loaded_cfg, loaded = official.load(tiny_file)
    assert loaded_cfg.to_dict() == cfg.to_dict()
    assert_trees_bitwise_equal(jax.device_get(loaded), params)


def test_text_heads_come_from_the_file_when_not_given(tmp_path):
    cfg = tiny_config()
    cfg.text.num_heads = 8  # 128 / 8: shapes alone would suggest 4
    params = random_params(cfg, seed=1)
    official.save(tmp_path / "h8.th", cfg, params)
    assert official.load(tmp_path / "h8.th")[0].text.num_heads == 8
    assert official.load(tmp_path / "h8.th", text_num_heads=8)[0].text.num_heads == 8
    with pytest.raises(CheckpointError, match=r"h8\.th records 8 text attention heads, but text_num_heads=4"):
        official.load(tmp_path / "h8.th", text_num_heads=4)


def test_retrieval_layout_keys_and_round_trip(golden_dir, tiny, tmp_path):
    cfg, params = tiny
    official.save(tmp_path / "retrieval.th", cfg, params, layout="retrieval")
    state_dict = torch.load(tmp_path / "retrieval.th", weights_only=True)["model"]
    expected = read_key_list(golden_dir / "tiny_retrieval_state_dict_keys.txt")  # no dtype column
    assert [(k, tuple(v.shape), None) for k, v in state_dict.items()] == expected
    assert all(v.dtype == (torch.int64 if k.endswith(("_index", "_ids")) else torch.float32)
               for k, v in state_dict.items())
    loaded_cfg, loaded = official.load(tmp_path / "retrieval.th")
    assert loaded_cfg.to_dict() == cfg.to_dict()
    heads_free = {k: v for k, v in params.items() if k not in ("mlm_head", "bbox_head")}
    assert_trees_bitwise_equal(jax.device_get(loaded), heads_free)
    again = official.state_dict_from_params(loaded_cfg, loaded, layout="retrieval")
    assert list(again) == list(state_dict)
    assert all(torch.equal(again[k], state_dict[k]) for k in state_dict)


def test_full_size_key_list_matches_golden(golden_dir):
    spec = official_shapes(base_model_config())
    expected = {(k, shape) for k, shape, _ in read_key_list(golden_dir / "full_state_dict_keys.txt")}
    assert len(spec) == len(expected) == 644
    assert {(k, shape) for k, shape, _ in spec} == expected
    tied = {DECODER, "text_encoder.cls.predictions.decoder.bias"}
    unique = sum(int(np.prod(shape)) for k, shape, dtype in spec
                 if k not in tied and dtype == "float32" and not k.endswith("attn_mask"))
    assert unique == 525_677_393  # the reference's "Total Params" (spec §1.7)


def write_checkpoint(path, state_dict):
    torch.save({"model": state_dict, "config": {}}, path)
    return path


@pytest.fixture()
def tiny_state_dict(tiny):
    return dict(official.state_dict_from_params(*tiny))


def test_random_bytes_are_rejected(tmp_path):
    path = tmp_path / "noise.th"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=r"noise\.th: cannot be read as a PyTorch checkpoint"):
        official.load(path)


def test_truncated_file_is_rejected(tiny_file, tmp_path):
    data = tiny_file.read_bytes()
    path = tmp_path / "cut.th"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.th: cannot be read"):
        official.load(path)


def test_wrong_shape_names_the_key(tiny_state_dict, tmp_path):
    tiny_state_dict[LAYER3_OUT] = torch.zeros(128, 100)
    with pytest.raises(CheckpointError, match=rf"1 tensor\(s\) do not fit.*{LAYER3_OUT}.*\(128, 100\)"):
        official.load(write_checkpoint(tmp_path / "shape.th", tiny_state_dict))


def test_missing_keys_are_named(tiny_state_dict, tmp_path):
    del tiny_state_dict[LAYER3_OUT]
    del tiny_state_dict["itm_head.3.bias"]
    with pytest.raises(CheckpointError, match=rf"2 missing key\(s\), first: \['{LAYER3_OUT}', 'itm_head.3.bias'\]"):
        official.load(write_checkpoint(tmp_path / "missing.th", tiny_state_dict))


def test_extra_keys_are_named(tiny_state_dict, tmp_path):
    tiny_state_dict["text_encoder.bert.pooler.dense.weight"] = torch.zeros(128, 128)
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\), first: \['text_encoder.bert.pooler"):
        official.load(write_checkpoint(tmp_path / "extra.th", tiny_state_dict))


def test_different_architecture_is_rejected(tiny_state_dict, tmp_path):
    numpy_state_dict = {k: v.numpy() for k, v in tiny_state_dict.items()}
    with pytest.raises(CheckpointError, match=r"missing key\(s\), first: \['vision_encoder.layers.2.blocks.2.norm1"):
        official.params_from_state_dict(numpy_state_dict, base_model_config())
    wider = tiny_config()
    wider.text.intermediate_size = 512
    with pytest.raises(CheckpointError, match=r"36 tensor\(s\) do not fit the architecture, first: "
                                              r"text_encoder.bert.encoder.layer.0.intermediate.dense.weight: "
                                              r"shape \(256, 128\) does not fit"):
        official.params_from_state_dict(numpy_state_dict, wider)
    xlmr_like = {"roberta.embeddings.word_embeddings.weight": torch.zeros(10, 4)}
    with pytest.raises(CheckpointError, match="not a CCLM checkpoint"):
        official.load(write_checkpoint(tmp_path / "xlmr.th", xlmr_like))


def test_untied_decoder_and_stale_buffers_are_rejected(tiny_state_dict, tmp_path):
    untied = dict(tiny_state_dict, **{DECODER: tiny_state_dict[WORDS] + 1})
    with pytest.raises(CheckpointError, match=f"tied weights differ: \\['{DECODER} != {WORDS}'\\]"):
        official.load(write_checkpoint(tmp_path / "untied.th", untied))
    mask_key = "vision_encoder.layers.1.blocks.1.attn_mask"
    stale = dict(tiny_state_dict, **{mask_key: torch.zeros_like(tiny_state_dict[mask_key])})
    with pytest.raises(CheckpointError, match=f"1 buffer\\(s\\) differ.*{mask_key}"):
        official.load(write_checkpoint(tmp_path / "stale.th", stale))


def test_stripped_buffers_and_tied_copies_are_optional(tiny, tiny_state_dict, tmp_path):
    lean = {k: v for k, v in tiny_state_dict.items()
            if not k.endswith(("attn_mask", "relative_position_index", "position_ids")) and k != DECODER}
    cfg, params = official.load(write_checkpoint(tmp_path / "lean.th", lean))
    assert cfg.vision.image_res == 224  # from the window when the masks are gone
    assert_trees_bitwise_equal(jax.device_get(params), tiny[1])


def test_failed_save_keeps_the_older_file_and_leaves_no_temporary(tiny, tiny_file, tmp_path, monkeypatch):
    path = tmp_path / "model.th"
    path.write_bytes(tiny_file.read_bytes())
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        official.save(path, *tiny)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.th"]


def test_dtypes_are_checked_naming_the_file_and_first_key(tiny_state_dict, tmp_path):
    ints = {k: v.to(torch.int32) if v.is_floating_point() else v for k, v in tiny_state_dict.items()}
    first = next(k for k, v in tiny_state_dict.items() if v.is_floating_point())
    with pytest.raises(CheckpointError, match=rf"ints\.th: {first} has dtype int32, expected a floating dtype"):
        official.load(write_checkpoint(tmp_path / "ints.th", ints))
    index = "vision_encoder.layers.0.blocks.0.attn.relative_position_index"
    float_index = dict(tiny_state_dict, **{index: tiny_state_dict[index].to(torch.float32)})
    with pytest.raises(CheckpointError, match=rf"{index} has dtype float32, expected an integer dtype"):
        official.load(write_checkpoint(tmp_path / "float_index.th", float_index))
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() and "attn_mask" not in k else v
            for k, v in tiny_state_dict.items()}
    cfg, _ = official.load(write_checkpoint(tmp_path / "bf16.th", bf16))  # any float width is cast
    assert cfg.text.hidden_size == 128
