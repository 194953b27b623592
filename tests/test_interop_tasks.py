"""Official fine-tuning checkpoint layouts (XVNLI, NLVR/MaRVL, VQA/xGQA): key lists derived independently from the
pre-training list the way the official `load_pretrained` functions map it, bitwise .th -> JAX -> .th round trips,
parameters on the right Flax paths (NLVR even/odd copies and shared key/value, VQA decoder and LM head), errors
naming the offending keys, and `cclm-jax import/export` through run directories."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from cclm_jax.interop import official
from cclm_jax.interop.export import export_safetensors
from cclm_jax.interop.files import CheckpointError, open_checkpoint
from cclm_jax.interop.shapes import official_shapes, param_shapes
from cclm_jax.interop.workdir import export_workdir, read_run_config, restore_params
from cclm_jax.models import tasks, tiny_model_config
from cclm_jax.train.import_run import import_to_workdir

F = 2  # fusion layer of the test architecture (4 text layers: 2 text + 2 fusion)
CLASSES = {"xvnli": 3, "nlvr": 2}
LAYOUT_TASK = {"xvnli": "xvnli", "nlvr": "marvl", "vqa": "xgqa"}


def micro_config():
    """32 px, Swin stages of 2 blocks (stage 0 has a shifted-window mask), 2 text + 2 fusion layers; the
    yaml's embed_dim / temp are recorded in the fake file's config (the tensors do not hold them)."""
    cfg = tiny_model_config()
    cfg.vision.update(image_res=32, window_size=4, depths=(2, 2), num_heads=(2, 4), embed_dim=64)
    cfg.text.update(num_layers=2 * F, fusion_layer=F)
    cfg.temp = float(np.float32(cfg.temp))
    return cfg


def _layer(key):
    m = re.match(r"(text_encoder(?:\.bert)?\.encoder\.layer)\.(\d+)\.(.*)", key)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def _mlp_head(name, hidden, classes):
    return [(f"{name}.0.weight", (2 * hidden, hidden)), (f"{name}.0.bias", (2 * hidden,)),
            (f"{name}.1.weight", (2 * hidden,)), (f"{name}.1.bias", (2 * hidden,)),
            (f"{name}.3.weight", (classes, 2 * hidden)), (f"{name}.3.bias", (classes,))]


def official_keys(cfg, layout):
    """[(key, shape)] of the official fine-tuning state_dict, derived from the pre-training key list (itself
    checked against the golden list in test_interop_official) by the renaming of the official code:
    `load_pretrained(load_text=True)` drops `bert.`; NLVRModel.load_pretrained puts fusion layer l at F+2(l-F)
    and F+2(l-F)+1; VQAModel.load_pretrained copies the embeddings, fusion layers l -> l-F and `cls.*` to
    `text_decoder.{bert,cls}.*`. Modules are registered vision, text encoder, (decoder), head."""
    pre = [(k, s) for k, s, _ in official_shapes(cfg, "pretrain")]
    hidden = cfg.text.hidden_size
    vision = [(k, s) for k, s in pre if k.startswith("vision_encoder.")]
    bert = [(k, s) for k, s in pre if k.startswith("text_encoder.bert.")]
    encoder = [(k.replace("text_encoder.bert.", "text_encoder.", 1), s) for k, s in bert]
    if layout == "xvnli":
        return vision + encoder + _mlp_head("cls_head", hidden, 3)
    if layout == "nlvr":
        embeddings = [(k, s) for k, s in encoder if not _layer(k)]
        by_layer = {}
        for k, s in encoder:
            if (parts := _layer(k)) is None:
                continue
            prefix, layer, rest = parts
            targets = [layer] if layer < F else [F + 2 * (layer - F), F + 2 * (layer - F) + 1]
            for t in targets:
                by_layer.setdefault(t, []).append((f"{prefix}.{t}.{rest}", s))
        layers = [item for t in sorted(by_layer) for item in by_layer[t]]
        return vision + embeddings + layers + _mlp_head("cls_head", hidden, 2)
    assert layout == "vqa"
    decoder = []
    for k, s in bert:
        parts = _layer(k)
        if parts is not None and parts[1] < F:
            continue
        if parts is not None:
            k = f"{parts[0]}.{parts[1] - F}.{parts[2]}"
        decoder.append((k.replace("text_encoder", "text_decoder", 1), s))
    cls = [(k.replace("text_encoder.", "text_decoder.", 1), s) for k, s in pre
           if k.startswith("text_encoder.cls.")]
    return vision + encoder + decoder + cls


def fake_state_dict(cfg, layout, seed=0):
    """An official state_dict of `layout` with independent random values per tensor, except what the official
    models share: NLVR's odd copies' cross key/value ARE the even copies' tensors (`share_cross_attention`),
    the VQA LM decoder weight/bias ARE the decoder word embeddings / prediction bias. Buffers: the pre-training
    file's (vision buffers, `position_ids`)."""
    rng = np.random.default_rng(seed)
    buffers = {k: v for k, v in official.state_dict_from_params(
        cfg, jax.tree.map(lambda s: np.zeros(s, np.float32), param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))).items()
        if k.endswith(("attn_mask", "relative_position_index", "position_ids"))}
    out = {}
    for key, shape in official_keys(cfg, layout):
        if key.endswith(("attn_mask", "relative_position_index", "position_ids")):
            out[key] = buffers[key.replace("text_decoder.bert.", "text_encoder.bert.").replace(
                "text_encoder.embeddings.", "text_encoder.bert.embeddings.")]
            continue
        parts = _layer(key)
        if layout == "nlvr" and parts and parts[1] >= F and (parts[1] - F) % 2 and re.match(
                r"crossattention\.self\.(key|value)\.", parts[2]):
            out[key] = out[f"{parts[0]}.{parts[1] - 1}.{parts[2]}"]
        elif key == "text_decoder.cls.predictions.decoder.weight":
            out[key] = out["text_decoder.bert.embeddings.word_embeddings.weight"]
        elif key == "text_decoder.cls.predictions.decoder.bias":
            out[key] = out["text_decoder.cls.predictions.bias"]
        else:
            out[key] = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    return out


def write(path, state_dict, cfg):
    torch.save({"model": state_dict, "config": {"embed_dim": cfg.embed_dim, "temp": cfg.temp}}, path)
    return path


@pytest.fixture(scope="module")
def cfg():
    return micro_config()


@pytest.fixture(scope="module", params=["xvnli", "nlvr", "vqa"])
def layout_file(request, cfg, tmp_path_factory):
    layout = request.param
    state_dict = fake_state_dict(cfg, layout, seed=len(layout))
    path = write(tmp_path_factory.mktemp(layout) / f"{layout}.th", state_dict, cfg)
    return layout, state_dict, path


@pytest.fixture(scope="module")
def loaded(layout_file):
    _, _, path = layout_file
    return official.load(path)


def linear(state_dict, key):
    """The Flax kernel (in, out) of an official Linear weight (out, in)."""
    return state_dict[key].numpy().T


def test_key_lists_match_the_official_mapping(cfg):
    for layout in ("xvnli", "nlvr", "vqa"):
        ours = [(k, s) for k, s, _ in official_shapes(cfg, layout)]
        assert ours == official_keys(cfg, layout), layout


def test_th_to_jax_to_th_is_bitwise_and_key_for_key(layout_file, loaded, cfg, tmp_path):
    layout, state_dict, path = layout_file
    assert official.detect_layout(state_dict) == layout
    loaded_cfg, params = loaded
    assert loaded_cfg.to_dict() == cfg.to_dict()  # the pre-trained architecture (N = 4 also for NLVR's 6 layers)
    exported = official.state_dict_from_params(loaded_cfg, params, layout=layout)
    assert list(exported) == list(state_dict)
    for key, ref in state_dict.items():
        assert exported[key].dtype == ref.dtype and torch.equal(exported[key], ref), key
    official.save(tmp_path / "again.th", loaded_cfg, params, layout=layout)
    saved = torch.load(tmp_path / "again.th", weights_only=True)["model"]
    assert list(saved) == list(state_dict)
    shared = {"nlvr": ("text_encoder.encoder.layer.3.crossattention.self.key.weight",
                       "text_encoder.encoder.layer.2.crossattention.self.key.weight"),
              "vqa": ("text_decoder.cls.predictions.decoder.weight",
                      "text_decoder.bert.embeddings.word_embeddings.weight")}.get(layout)
    if shared:  # one storage under both names, as torch.save writes a shared Parameter
        assert saved[shared[0]].data_ptr() == saved[shared[1]].data_ptr()


def test_params_are_the_task_models_tree(layout_file, loaded, cfg):
    layout, _, _ = layout_file
    _, params = loaded
    model = {"xvnli": tasks.XVNLIModel, "nlvr": tasks.NLVRModel, "vqa": tasks.VQAModel}[layout](cfg)
    image = jnp.zeros((1, 32, 32, 3))
    ids = jnp.ones((1, 5), jnp.int32)
    args = {"xvnli": (image, ids, ids), "nlvr": (image, image, ids, ids), "vqa": (image, ids, ids, ids, ids)}[layout]
    out = jax.eval_shape(lambda p: model.apply({"params": p}, *args), params)  # traces every parameter use
    assert out.shape == ((1, CLASSES[layout]) if layout in CLASSES else (1,))
    init = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args)["params"]))
    shapes = lambda tree: jax.tree.map(np.shape, tree, is_leaf=lambda x: hasattr(x, "shape"))  # noqa: E731
    assert shapes(init) == shapes(params)


def test_nlvr_copies_and_shared_key_value_land_on_their_layers(cfg, tmp_path):
    state_dict = fake_state_dict(cfg, "nlvr", seed=7)
    _, params = official.load(write(tmp_path / "nlvr.th", state_dict, cfg))
    text = jax.device_get(params["text_encoder"])
    assert sorted(text) == ["embeddings"] + [f"layer_{i}" for i in range(F + 2 * F)]
    for copy_index in range(F, 3 * F):  # torch layer i -> Flax layer_i; even copies attend image 0
        torch_layer, flax_layer = f"text_encoder.encoder.layer.{copy_index}", text[f"layer_{copy_index}"]
        np.testing.assert_array_equal(flax_layer["crossattention"]["self"]["query"]["kernel"].reshape(128, 128),
                                      linear(state_dict, f"{torch_layer}.crossattention.self.query.weight"))
        np.testing.assert_array_equal(flax_layer["intermediate"]["dense"]["kernel"],
                                      linear(state_dict, f"{torch_layer}.intermediate.dense.weight"))
        cross_self = flax_layer["crossattention"]["self"]
        if (copy_index - F) % 2:  # odd copy: key/value only in its even partner
            assert sorted(cross_self) == ["query"]
        else:
            for name in ("key", "value"):
                for copy in (copy_index, copy_index + 1):
                    np.testing.assert_array_equal(
                        cross_self[name]["kernel"].reshape(128, 128),
                        linear(state_dict, f"text_encoder.encoder.layer.{copy}.crossattention.self.{name}.weight"))
                np.testing.assert_array_equal(
                    cross_self[name]["bias"].reshape(-1),
                    state_dict[f"text_encoder.encoder.layer.{copy_index + 1}.crossattention.self.{name}.bias"])
    full = tasks.lend_shared_cross_kv(params, F)["text_encoder"]  # what NLVRModel.apply runs with
    assert full["layer_3"]["crossattention"]["self"]["key"] is params["text_encoder"]["layer_2"][
        "crossattention"]["self"]["key"]
    np.testing.assert_array_equal(jax.device_get(params["cls_head"]["fc2"]["kernel"]),
                                  linear(state_dict, "cls_head.3.weight"))


def test_vqa_decoder_and_lm_head_land_on_their_paths(cfg, tmp_path):
    state_dict = fake_state_dict(cfg, "vqa", seed=8)
    _, params = official.load(write(tmp_path / "vqa.th", state_dict, cfg))
    params = jax.device_get(params)
    decoder = params["text_decoder"]
    assert sorted(decoder) == ["embeddings"] + [f"layer_{i}" for i in range(F)]
    for i in range(F):  # every decoder layer cross-attends (fusion_layer 0 in the official decoder config)
        np.testing.assert_array_equal(
            decoder[f"layer_{i}"]["crossattention"]["self"]["value"]["kernel"].reshape(128, 128),
            linear(state_dict, f"text_decoder.bert.encoder.layer.{i}.crossattention.self.value.weight"))
    np.testing.assert_array_equal(decoder["embeddings"]["word_embeddings"],
                                  state_dict["text_decoder.bert.embeddings.word_embeddings.weight"].numpy())
    np.testing.assert_array_equal(params["text_encoder"]["embeddings"]["word_embeddings"],
                                  state_dict["text_encoder.embeddings.word_embeddings.weight"].numpy())
    np.testing.assert_array_equal(params["lm_head"]["bias"], state_dict["text_decoder.cls.predictions.bias"].numpy())
    np.testing.assert_array_equal(params["lm_head"]["transform"]["dense"]["kernel"],
                                  linear(state_dict, "text_decoder.cls.predictions.transform.dense.weight"))
    np.testing.assert_array_equal(params["text_encoder"]["layer_3"]["crossattention"]["self"]["key"]["kernel"]
                                  .reshape(128, 128),
                                  linear(state_dict, "text_encoder.encoder.layer.3.crossattention.self.key.weight"))


def test_xvnli_head_lands_on_its_path(cfg, tmp_path):
    state_dict = fake_state_dict(cfg, "xvnli", seed=9)
    _, params = official.load(write(tmp_path / "xvnli.th", state_dict, cfg))
    head = jax.device_get(params["cls_head"])
    np.testing.assert_array_equal(head["fc1"]["kernel"], linear(state_dict, "cls_head.0.weight"))
    np.testing.assert_array_equal(head["norm"]["scale"], state_dict["cls_head.1.weight"].numpy())
    np.testing.assert_array_equal(head["fc2"]["bias"], state_dict["cls_head.3.bias"].numpy())
    assert sorted(params) == ["cls_head", "text_encoder", "vision_encoder"]


# ------------------------------------------------------------------------------------------------------ errors

@pytest.fixture(scope="module")
def nlvr_state_dict(cfg):
    return fake_state_dict(cfg, "nlvr", seed=3)


def test_missing_and_unexpected_keys_are_named(nlvr_state_dict, cfg, tmp_path):
    broken = {k: v for k, v in nlvr_state_dict.items()
              if k not in ("text_encoder.encoder.layer.4.output.dense.weight", "cls_head.3.bias")}
    broken["text_encoder.pooler.dense.weight"] = torch.zeros(128, 128)
    with pytest.raises(CheckpointError, match=r"2 missing key\(s\), first: \['text_encoder.encoder.layer.4.output."
                                              r"dense.weight', 'cls_head.3.bias'\]; 1 unexpected key\(s\), first: "
                                              r"\['text_encoder.pooler.dense.weight'\]"):
        official.load(write(tmp_path / "missing.th", broken, cfg))


def test_unshared_key_value_of_an_nlvr_pair_is_rejected(nlvr_state_dict, cfg, tmp_path):
    odd = "text_encoder.encoder.layer.5.crossattention.self.value.bias"
    even = "text_encoder.encoder.layer.4.crossattention.self.value.bias"
    broken = dict(nlvr_state_dict, **{odd: nlvr_state_dict[odd] + 1})
    with pytest.raises(CheckpointError, match=re.escape(f"tied weights differ: ['{odd} != {even}']")):
        official.load(write(tmp_path / "unshared.th", broken, cfg))


def test_odd_number_of_nlvr_fusion_layers_is_rejected(nlvr_state_dict, cfg, tmp_path):
    broken = {k: v for k, v in nlvr_state_dict.items() if not k.startswith("text_encoder.encoder.layer.5.")}
    with pytest.raises(CheckpointError, match=r"holds every fusion layer twice; found 5 layers with cross-attention "
                                              r"from layer 2"):
        official.load(write(tmp_path / "odd.th", broken, cfg))


def test_wrong_head_shapes_are_named(nlvr_state_dict, cfg, tmp_path):
    wide = dict(nlvr_state_dict, **{"cls_head.0.weight": torch.zeros(200, 128)})
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) do not fit.*cls_head.0.weight: shape \(200, 128\)"):
        official.load(write(tmp_path / "wide.th", wide, cfg))
    four = dict(nlvr_state_dict, **{"cls_head.3.weight": torch.zeros(4, 256), "cls_head.3.bias": torch.zeros(4)})
    with pytest.raises(CheckpointError, match=r"cls_head.3.weight has 4 outputs: expected 3 \(XVNLI\) or 2"):
        official.load(write(tmp_path / "four.th", four, cfg))


def test_vqa_with_a_missing_decoder_layer_is_rejected(cfg, tmp_path):
    state_dict = {k: v for k, v in fake_state_dict(cfg, "vqa").items()
                  if not k.startswith("text_decoder.bert.encoder.layer.1.")}
    with pytest.raises(CheckpointError, match=r"missing key\(s\), first: \['text_decoder.bert.encoder.layer.1."
                                              r"attention.self.query.weight'"):
        official.load(write(tmp_path / "vqa_short.th", state_dict, cfg))


def test_params_of_another_task_are_rejected_on_export(loaded, layout_file):
    layout, _, _ = layout_file
    other = {"xvnli": "vqa", "nlvr": "xvnli", "vqa": "nlvr"}[layout]
    with pytest.raises(ValueError, match=f"do not match the model config and the '{other}' layout"):
        official.state_dict_from_params(loaded[0], loaded[1], layout=other)


# ------------------------------------------------------------------------------------------- run directories

def test_import_records_the_task_and_export_gives_the_file_back(layout_file, cfg, tmp_path):
    layout, state_dict, path = layout_file
    if layout != "nlvr" and os.environ.get("CCLM_INTEGRATION") != "1":
        pytest.skip("Orbax round trip of ~1,500 arrays takes seconds: NLVR (the intricate layout) by default, "
                    "every layout with CCLM_INTEGRATION=1")
    workdir = tmp_path / "run"
    assert import_to_workdir(str(path), str(workdir)) == 0
    config = read_run_config(str(workdir))
    assert config.task == LAYOUT_TASK[layout]
    assert json.loads(config.model.to_json()) == json.loads(cfg.to_json())  # JSON: tuples read back as lists
    assert config.init.checkpoint == str(path)
    _, params = restore_params(str(workdir))
    assert params["vision_encoder"]["norm"]["scale"].shape == (128,)
    exported = export_workdir(str(workdir), str(tmp_path / "out.th"))
    again = torch.load(exported, weights_only=True)["model"]
    assert list(again) == list(state_dict)
    assert all(torch.equal(again[k], v) for k, v in state_dict.items())


def test_safetensors_export_of_a_task_layout(layout_file, loaded, tmp_path):
    layout, state_dict, _ = layout_file
    if layout != "vqa":
        pytest.skip("one layout with tied copies suffices")
    path = export_safetensors(tmp_path, *loaded, layout=layout)
    written = open_checkpoint(path)
    assert sorted(written) == sorted(state_dict)  # stored by item size: int64 buffers first
    assert all(np.array_equal(written[k], v.numpy()) for k, v in state_dict.items())
    _, params = official.load(path)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), params, loaded[1]))
