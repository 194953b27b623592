"""CCLM-X2VLM towers from public-layout checkpoints (`interop.pretrained.init_towers_from_hf`): the golden fixture's
own init files (its shipped fake XLM-R; a BEiT-v2 `.pth` and an X2-VLM-style BERT built from the tensors that
`init/provenance.json` names) reproduce `ref_ckpt.th`, and an HF `Dinov2Model` file maps onto the ViT tower."""
import json

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cclm_jax.interop import official
from cclm_jax.interop.files import CheckpointError
from cclm_jax.interop.layout import get_path, to_torch_array, vit_entries
from cclm_jax.interop.pretrained import init_towers_from_hf
from cclm_jax.interop.shapes import param_shapes
from cclm_jax.models import vit_vision_config, x2vlm_model_config
from tests.conftest import SHARED

GOLDEN = SHARED / "reference" / "golden_x2vlm"


@pytest.fixture(scope="module")
def golden_files(tmp_path_factory):
    """(model_config, golden params, beit .pth, XLM-R dir, BERT safetensors): the init files of the fixture."""
    if not (GOLDEN / "ref_ckpt.th").exists():
        pytest.skip("../shared/reference/golden_x2vlm is absent")
    tmp = tmp_path_factory.mktemp("x2vlm_init")
    sd = torch.load(GOLDEN / "ref_ckpt.th", map_location="cpu", weights_only=False)["model"]
    provenance = json.loads((GOLDEN / "init" / "provenance.json").read_text())["provenance"]
    beit = {src[len("beit:"):]: sd[key].clone() for key, src in provenance.items() if src.startswith("beit:")}
    beit.update({"head.weight": torch.randn(10, 128), "head.bias": torch.zeros(10),
                 "blocks.0.attn.relative_position_index": sd["vision_encoder.blocks.0.attn.relative_position_index"]})
    torch.save({"model": beit}, tmp / "beitv2_tiny.pth")
    # An X2-VLM-style BERT: 6 layers, cross-attention in layers 4, 5 (the golden cross layers), embeddings and an
    # MLM head that the cross encoder does not use.
    bert = {src[len("x2vlm:text_encoder."):]: sd[key].clone() for key, src in provenance.items()
            if src.startswith("x2vlm:text_encoder.bert.encoder")}
    for i in range(4):
        for name, t in list(bert.items()):
            if ".layer.4." in name and ".crossattention." not in name:
                bert[name.replace(".layer.4.", f".layer.{i}.")] = torch.randn_like(t)
    bert["bert.embeddings.word_embeddings.weight"] = torch.randn(1000, 128)
    bert["cls.predictions.bias"] = torch.zeros(1000)
    save_file({k: v.contiguous() for k, v in bert.items()}, tmp / "bert.safetensors")
    cfg, params = official.load(GOLDEN / "ref_ckpt.th")
    return cfg, params, tmp / "beitv2_tiny.pth", GOLDEN / "init" / "xlm-roberta-base-tiny", tmp / "bert.safetensors"


def test_golden_towers_reproduce_the_reference_checkpoint(golden_files):
    cfg, golden, beit, xlmr, bert = golden_files
    params, from_pretrained = init_towers_from_hf(cfg, jax.random.PRNGKey(0), vision=beit, text=xlmr, cross=bert)
    for tower in ("vision_encoder", "text_encoder", "cross_encoder"):
        assert all(jax.tree.leaves(from_pretrained[tower])), tower
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     params[tower], golden[tower])
    for new in ("mlm_head", "itm_head", "bbox_head", "text_proj", "vision_proj", "temp"):
        assert not any(jax.tree.leaves(from_pretrained[new])), new
    assert params["mlm_head"]["decoder"].shape == (1000, 128)


def test_missing_or_misfit_tensors_name_the_file(golden_files, tmp_path):
    cfg, _, beit, xlmr, _ = golden_files
    wide = cfg.copy_and_resolve_references()
    wide.text.intermediate_size = 512
    wide.cross.intermediate_size = 512
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*intermediate.dense"):
        init_towers_from_hf(wide, jax.random.PRNGKey(0), text=xlmr)
    sd = torch.load(beit, weights_only=True)["model"]
    sd["extra.weight"] = torch.zeros(3)
    torch.save({"model": sd}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected key.*extra.weight"):
        init_towers_from_hf(cfg, jax.random.PRNGKey(0), vision=tmp_path / "extra.pth")


def _hf_dinov2(params: dict, v) -> dict:
    """Our ViT parameters -> an HF `Dinov2Model` state_dict (what `save_pretrained` writes, `dinov2.` prefix)."""
    timm = {e.key: to_torch_array(e, np.asarray(get_path(params, e.path))) for e in vit_entries(v, "", ())
            if e.kind != "buffer"}
    timm = {k[1:]: a for k, a in timm.items()}
    out = {"embeddings.cls_token": timm["cls_token"], "embeddings.position_embeddings": timm["pos_embed"],
           "embeddings.mask_token": np.zeros((1, v.embed_dim), np.float32),
           "embeddings.patch_embeddings.projection.weight": timm["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": timm["patch_embed.proj.bias"],
           "layernorm.weight": timm["norm.weight"], "layernorm.bias": timm["norm.bias"]}
    for i in range(v.depth):
        b, layer = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for j, proj in enumerate(("query", "key", "value")):
                qkv = timm[f"{b}attn.qkv.{kind}"]
                out[f"{layer}attention.attention.{proj}.{kind}"] = np.split(qkv, 3, axis=0)[j]
            for theirs, ours in (("norm1", "norm1"), ("norm2", "norm2"), ("attention.output.dense", "attn.proj"),
                                 ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[f"{layer}{theirs}.{kind}"] = timm[f"{b}{ours}.{kind}"]
        out[f"{layer}layer_scale1.lambda1"] = timm[f"{b}gamma_1"]
        out[f"{layer}layer_scale2.lambda1"] = timm[f"{b}gamma_2"]
    return {"dinov2." + k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in out.items()}


def test_dinov2_hf_file_maps_onto_the_vit_tower(tmp_path):
    """A DINOv2 tower (stored grid 5, run at 4x4) in CCLM-X2VLM: HF names, split q/k/v and layer scales land on
    the right parameters bit for bit (the forward pass is checked against torch in test_vit.py)."""
    cfg = x2vlm_model_config("tiny")
    cfg.vision = vit_vision_config("dinov2", "small")
    cfg.vision.update(image_res=16, patch_size=4, embed_dim=128, depth=2, num_heads=4, pos_grid=5)
    rng = np.random.default_rng(0)
    vision = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), param_shapes(cfg)["vision_encoder"],
                          is_leaf=lambda x: isinstance(x, tuple))
    (tmp_path / "dinov2").mkdir()
    save_file(_hf_dinov2(vision, cfg.vision), tmp_path / "dinov2" / "model.safetensors")
    params, from_pretrained = init_towers_from_hf(cfg, jax.random.PRNGKey(0), vision=tmp_path / "dinov2")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params["vision_encoder"], vision)
    assert all(jax.tree.leaves(from_pretrained["vision_encoder"]))
    assert not any(jax.tree.leaves(from_pretrained["text_encoder"]))
    cfg.vision.pos_grid = 6
    with pytest.raises(CheckpointError, match="position_embeddings -> vision_encoder.pos_embed"):
        init_towers_from_hf(cfg, jax.random.PRNGKey(0), vision=tmp_path / "dinov2")

