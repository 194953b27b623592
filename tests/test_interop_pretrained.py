"""Initialisation from the golden fake XLM-R-large + Swin checkpoints, as the official pre-training does."""
import json
import math
import shutil

import jax
import numpy as np
import pytest
import torch

from cclm_jax.interop import official
from cclm_jax.interop.files import CheckpointError
from cclm_jax.interop.pretrained import default_layer_map, init_from_pretrained, source_key
from cclm_jax.models import tiny_model_config

XLMR, SWIN = "xlm-roberta-large-tiny", "swin_tiny_fake.pth"


def flat(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def is_new(path: str) -> bool:
    """The parameters the reference creates fresh (spec §6.3)."""
    top = path.split("'")[1]
    return top in ("text_proj", "vision_proj", "itm_head", "bbox_head", "temp") or "['crossattention']" in path


@pytest.fixture(scope="module")
def initialised(golden_dir):
    init = golden_dir / "init"
    return init_from_pretrained(tiny_model_config(), init / XLMR, init / SWIN, jax.random.PRNGKey(0))


def test_checkpoint_tensors_equal_what_the_official_code_loaded(golden_dir, initialised):
    params, from_pretrained = initialised
    reference = flat(official.params_from_state_dict(official.read_state_dict(golden_dir / "ref_ckpt.th"),
                                                     tiny_model_config()))
    params, from_pretrained = flat(params), flat(from_pretrained)
    assert set(params) == set(from_pretrained) == set(reference)
    assert {p for p, loaded in from_pretrained.items() if not loaded} == {p for p in params if is_new(p)}
    loaded = [p for p, was_loaded in from_pretrained.items() if was_loaded]
    assert len(loaded) == 321
    for path in loaded:
        value = np.asarray(params[path])
        assert value.dtype == np.float32 and np.array_equal(value, reference[path]), path


def test_new_parameters_follow_the_reference_initialisation(initialised):
    params = initialised[0]
    cross = params["text_encoder"]["layer_7"]["crossattention"]
    np.testing.assert_array_equal(cross["output"]["LayerNorm"]["scale"], 1.0)
    np.testing.assert_array_equal(cross["output"]["LayerNorm"]["bias"], 0.0)
    np.testing.assert_array_equal(cross["self"]["key"]["bias"], 0.0)
    kernels = np.concatenate([np.ravel(params["text_encoder"][f"layer_{i}"]["crossattention"]["self"][n]["kernel"])
                              for i in range(6, 12) for n in ("query", "key", "value")])
    assert abs(kernels.std() - 0.02) < 0.001 and abs(kernels.mean()) < 0.001  # BERT N(0, 0.02)
    bound = 1 / math.sqrt(128)  # PyTorch default Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    proj = np.asarray(params["text_proj"]["kernel"])
    assert np.abs(proj).max() <= bound and np.abs(proj).max() > 0.9 * bound
    assert abs(proj.std() - bound / math.sqrt(3)) < 0.1 * bound
    assert np.float32(params["temp"]) == np.float32(0.07)
    assert not np.array_equal(params["itm_head"]["fc1"]["kernel"], params["bbox_head"]["fc1"]["kernel"])


def test_source_keys_follow_the_reference_renaming():
    layers = default_layer_map(12)
    assert layers == list(range(1, 24, 2))
    assert source_key("text_encoder.bert.encoder.layer.4.attention.self.query.weight", layers) == (
        "xlmr", "roberta.encoder.layer.9.attention.self.query.weight")
    assert source_key("text_encoder.bert.encoder.layer.7.crossattention.self.key.weight", layers) is None
    assert source_key("text_encoder.bert.embeddings.LayerNorm.bias", layers) == (
        "xlmr", "roberta.embeddings.LayerNorm.bias")
    assert source_key("text_encoder.cls.predictions.transform.LayerNorm.weight", layers) == (
        "xlmr", "lm_head.layer_norm.weight")
    assert source_key("text_encoder.cls.predictions.bias", layers) == ("xlmr", "lm_head.bias")
    assert source_key("vision_encoder.layers.2.downsample.reduction.weight", layers) == (
        "swin", "layers.2.downsample.reduction.weight")
    assert source_key("itm_head.0.weight", layers) is None
    assert source_key("text_encoder.bert.encoder.layer.0.output.dense.bias", [5] * 12) == (
        "xlmr", "roberta.encoder.layer.5.output.dense.bias")


@pytest.fixture()
def copies(golden_dir, tmp_path):
    """Writable copies of the two init checkpoints: (xlmr_dir, swin_path, xlmr state_dict, swin checkpoint)."""
    xlmr_dir = tmp_path / XLMR
    shutil.copytree(golden_dir / "init" / XLMR, xlmr_dir)
    xlmr = torch.load(xlmr_dir / "pytorch_model.bin", weights_only=True)
    swin = torch.load(golden_dir / "init" / SWIN, weights_only=True)
    return xlmr_dir, tmp_path / SWIN, xlmr, swin


def run(copies, xlmr=None, swin=None, **kwargs):
    xlmr_dir, swin_path, xlmr_default, swin_default = copies
    torch.save(xlmr if xlmr is not None else xlmr_default, xlmr_dir / "pytorch_model.bin")
    torch.save(swin if swin is not None else swin_default, swin_path)
    return init_from_pretrained(tiny_model_config(), xlmr_dir, swin_path, jax.random.PRNGKey(0), **kwargs)


def test_xlmr_config_mismatch_names_the_field(copies):
    config_path = copies[0] / "config.json"
    config = json.loads(config_path.read_text())
    config.update(hidden_size=256, num_hidden_layers=12)
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: does not match the model config: hidden_size=256 but "
                                              r"model.text.hidden_size=128; num_hidden_layers=12 but layer_map "
                                              r"selects layer 23"):
        run(copies)


def test_missing_selected_layer_is_named(copies):
    xlmr = dict(copies[2])
    del xlmr["roberta.encoder.layer.23.output.dense.weight"]
    del xlmr["roberta.encoder.layer.22.output.dense.weight"]  # unselected: not needed
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: 1 missing key\(s\), first: "
                                              r"\['roberta.encoder.layer.23.output.dense.weight'\]"):
        run(copies, xlmr=xlmr)


def test_untied_decoder_is_rejected(copies):
    xlmr = dict(copies[2], **{"lm_head.decoder.weight": copies[2]["lm_head.decoder.weight"] * 2})
    with pytest.raises(CheckpointError, match="lm_head.decoder.weight must equal "
                                              "roberta.embeddings.word_embeddings.weight"):
        run(copies, xlmr=xlmr)


def test_untied_decoder_in_safetensors_is_rejected(copies):
    from safetensors.torch import save_file

    xlmr = dict(copies[2], **{"lm_head.decoder.weight": copies[2]["lm_head.decoder.weight"] + 1})
    save_file({k: v.contiguous() for k, v in xlmr.items()}, copies[0] / "model.safetensors")  # preferred
    with pytest.raises(CheckpointError, match=r"model.safetensors: lm_head.decoder.weight must equal"):
        run(copies)


def test_swin_extra_key_and_wrong_shape_are_named(copies):
    swin = {"model": dict(copies[3]["model"], **{"layers.0.blocks.0.attn.gamma": torch.zeros(3)})}
    with pytest.raises(CheckpointError, match=r"swin_tiny_fake.pth: 1 unexpected key\(s\).*"
                                              r"\['layers.0.blocks.0.attn.gamma'\]"):
        run(copies, swin=swin)
    swin = {"model": dict(copies[3]["model"], **{"layers.1.blocks.0.mlp.fc1.bias": torch.zeros(7)})}
    with pytest.raises(CheckpointError, match=r"layers.1.blocks.0.mlp.fc1.bias -> "
                                              r"vision_encoder.layers.1.blocks.0.mlp.fc1.bias: .*\(7,\)"):
        run(copies, swin=swin)


def test_bad_layer_map_is_rejected(copies):
    with pytest.raises(ValueError, match="layer_map .* must list 12 distinct"):
        run(copies, layer_map=[1, 3, 5])


def test_integer_tensors_are_rejected_naming_the_file_and_key(copies):
    key = "layers.0.blocks.0.mlp.fc1.weight"
    swin = {"model": dict(copies[3]["model"], **{key: copies[3]["model"][key].to(torch.int32)})}
    with pytest.raises(CheckpointError, match=rf"swin_tiny_fake.pth: {key} has dtype int32, expected a floating"):
        run(copies, swin=swin)
