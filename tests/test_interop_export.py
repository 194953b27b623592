"""safetensors export: official keys and values, both tied copies, dtypes, config.json, loadable by PyTorch."""
import json

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open

from cclm_jax.interop import official
from cclm_jax.interop.export import export_safetensors
from cclm_jax.interop.files import CheckpointError
from cclm_jax.interop.shapes import param_shapes
from cclm_jax.models import tiny_model_config

TIED = {"text_encoder.cls.predictions.decoder.weight": "text_encoder.bert.embeddings.word_embeddings.weight",
        "text_encoder.cls.predictions.bias": "text_encoder.cls.predictions.decoder.bias"}
TINY_CONFIG_JSON = {
    "vision": {"image_res": 224, "patch_size": 4, "embed_dim": 16, "depths": [2, 2, 2, 2],
               "num_heads": [1, 2, 4, 8], "window_size": 7, "mlp_ratio": 4.0},
    "text": {"vocab_size": 1000, "hidden_size": 128, "num_heads": 4, "intermediate_size": 256, "num_layers": 12,
             "fusion_layer": 6, "max_position_embeddings": 514, "type_vocab_size": 1, "layer_norm_eps": 1e-5},
    "embed_dim": 32,
}


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_model_config()
    cfg.temp = float(np.float32(cfg.temp))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s, dtype=np.float32), param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    params["temp"] = np.asarray(cfg.temp, np.float32)
    return cfg, params


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("export")
    return out_dir, export_safetensors(out_dir, *tiny)


def read_all(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.offset_keys()}, f.metadata()


def test_safetensors_holds_the_official_state_dict(tiny, exported):
    out_dir, path = exported
    assert path == out_dir / "model.safetensors"
    tensors, metadata = read_all(path)
    reference = official.state_dict_from_params(*tiny)
    assert set(tensors) == set(reference) and len(tensors) == 412
    for key, value in reference.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key
    for key, twin in TIED.items():  # two separate copies of the same values
        assert torch.equal(tensors[key], tensors[twin]) and tensors[key].data_ptr() != tensors[twin].data_ptr()
    assert metadata == {"format": "pt", "cclm_jax_layout": "pretrain", "dtype": "float32"}


def test_config_json_layout(exported):
    config = json.loads((exported[0] / "config.json").read_text())
    assert config == TINY_CONFIG_JSON
    assert isinstance(config["vision"]["depths"], list) and isinstance(config["vision"]["mlp_ratio"], float)


def test_load_reads_the_export_back_bitwise(tiny, exported):
    cfg, params = official.load(exported[1])
    assert cfg.to_dict() == tiny[0].to_dict()
    for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(tiny[1])):
        assert a.dtype == np.float32 and np.array_equal(a, b)


def test_pytorch_module_loads_the_export(tiny, exported):
    from cclm_jax.torch import load

    model = load(exported[0])
    reference = official.state_dict_from_params(*tiny)
    state = model.state_dict()
    for key, value in reference.items():
        assert torch.equal(state[key].to(value.dtype), value), key


def test_bfloat16_parameters_export_as_float32_unless_asked(tiny, tmp_path):
    cfg, params = tiny
    bf16 = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params)
    words = "text_encoder.bert.embeddings.word_embeddings.weight"
    index = "vision_encoder.layers.0.blocks.0.attn.relative_position_index"
    expected = torch.from_numpy(np.asarray(bf16["text_encoder"]["embeddings"]["word_embeddings"], np.float32))

    tensors, _ = read_all(export_safetensors(tmp_path / "f32", cfg, bf16))
    assert tensors[words].dtype == torch.float32 and torch.equal(tensors[words], expected)
    tensors, metadata = read_all(export_safetensors(tmp_path / "bf16", cfg, params, dtype="bfloat16"))
    assert tensors[words].dtype == torch.bfloat16 and torch.equal(tensors[words].float(), expected)
    assert tensors[index].dtype == torch.int64 and metadata["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="export dtype 'int8' is not one of"):
        export_safetensors(tmp_path / "bad", cfg, params, dtype="int8")


def test_params_that_do_not_fit_the_config_are_rejected(tiny, tmp_path):
    cfg, params = tiny
    broken = dict(params, itm_head={k: v for k, v in params["itm_head"].items() if k != "norm"})
    broken["text_proj"] = dict(params["text_proj"], bias=np.zeros(7, np.float32))
    with pytest.raises(ValueError, match=r"3 problem\(s\), first: \['text_proj/bias has shape \(7,\), the model "
                                         r"config needs \(32,\)', 'itm_head/norm/scale missing'"):
        export_safetensors(tmp_path, cfg, broken)
    assert not (tmp_path / "model.safetensors").exists()


def test_truncated_safetensors_is_rejected(exported, tmp_path):
    data = exported[1].read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="cannot be read as a safetensors file"):
        official.load(path)


def test_integer_parameters_are_rejected_naming_the_first_key(exported, tmp_path):
    from safetensors.torch import save_file

    tensors, metadata = read_all(exported[1])
    (tmp_path / "config.json").write_text((exported[0] / "config.json").read_text())
    as_int = {k: v.to(torch.int32) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(as_int, tmp_path / "model.safetensors", metadata)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        first = next(k for k in f.offset_keys() if tensors[k].is_floating_point())  # in file order
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: {first} has dtype int32, expected a floating "):
        official.load(tmp_path / "model.safetensors")
    half = {k: v.to(torch.float16) if v.is_floating_point() and not k.endswith("attn_mask") else v
            for k, v in tensors.items()}
    save_file(half, tmp_path / "model.safetensors", metadata)
    assert official.load(tmp_path / "model.safetensors")[0].text.num_heads == 4  # any float width is cast
