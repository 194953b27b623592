"""The ViT tower (models/vit.py): BEiT-v2 against the official golden vision embeddings, DINOv2 against a PyTorch
reference of HF `Dinov2Model` written here, the bicubic position resize against torch, scan vs loop."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import linen as nn

from cclm_jax.interop.layout import from_torch_array, set_path, to_torch_array, vit_entries
from cclm_jax.models import vit
from tests.conftest import SHARED

GOLDEN_X2VLM = SHARED / "reference" / "golden_x2vlm"


def _vision_config(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


def _tower(v: ml_collections.ConfigDict, **kwargs) -> vit.VisionTransformer:
    return vit.VisionTransformer(
        image_res=v.image_res, patch_size=v.patch_size, width=v.embed_dim, depth=v.depth, num_heads=v.num_heads,
        mlp_ratio=v.mlp_ratio, qkv_bias=v.qkv_bias, rel_pos_bias=v.rel_pos_bias, pos_grid=v.pos_grid,
        layer_scale_init=v.layer_scale_init, pool=v.pool, eps=v.layer_norm_eps, drop_path_rate=0.0, **kwargs)


BEIT_TINY = _vision_config(image_res=224, patch_size=16, embed_dim=128, depth=2, num_heads=2, mlp_ratio=4.0,
                           qkv_bias="qv", rel_pos_bias=True, pos_grid=0, layer_scale_init=0.1, pool="mean",
                           layer_norm_eps=1e-6)
DINO_TINY = _vision_config(image_res=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=4.0,
                           qkv_bias="qkv", rel_pos_bias=False, pos_grid=5, layer_scale_init=1.0, pool="cls",
                           layer_norm_eps=1e-6)


@pytest.mark.parametrize("src,dst", [(37, 16), (5, 4), (4, 7), (6, 6)])
def test_bicubic_resize_matrix_is_torch_interpolate(src, dst):
    x = np.random.default_rng(0).normal(size=(src, src, 3)).astype(np.float32)
    m = vit.bicubic_resize_matrix(src, dst)
    ours = np.einsum("ys,stc,xt->yxc", m, x, m)
    ref = F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=(dst, dst), mode="bicubic",
                        align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-6)  # measured max 1.3e-6 (float32 vs float64 weights)


def test_relative_position_index_layout():
    index = vit.relative_position_index(14)
    assert index.shape == (197, 197) and vit.relative_table_rows(14) == 732
    assert index[0, 0] == 731 and (index[0, 1:] == 729).all() and (index[1:, 0] == 730).all()
    # patch (y=1, x=2) -> patch (y=0, x=5): dy = 1, dx = -3
    q, k = 1 + 1 * 14 + 2, 1 + 0 * 14 + 5
    assert index[q, k] == (1 + 13) * 27 + (-3 + 13)
    if (GOLDEN_X2VLM / "ref_ckpt.th").exists():
        sd = torch.load(GOLDEN_X2VLM / "ref_ckpt.th", map_location="cpu", weights_only=False)["model"]
        np.testing.assert_array_equal(sd["vision_encoder.blocks.0.attn.relative_position_index"].numpy(), index)


def _params_from_torch(v, state_dict, shapes):
    params = {}
    for entry in vit_entries(v, "v", ()):
        if entry.kind != "buffer":
            set_path(params, entry.path,
                     from_torch_array(entry, np.asarray(state_dict[entry.key], np.float32),
                                      _get(shapes, entry.path)))
    return params


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


@pytest.fixture(scope="module")
def golden_beit():
    if not (GOLDEN_X2VLM / "ref_ckpt.th").exists():
        pytest.skip("../shared/reference/golden_x2vlm is absent")
    sd = torch.load(GOLDEN_X2VLM / "ref_ckpt.th", map_location="cpu", weights_only=False)["model"]
    sd = {"v." + k[len("vision_encoder."):]: t.numpy() for k, t in sd.items() if k.startswith("vision_encoder.")}
    tower = _tower(BEIT_TINY)
    shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(
        jax.eval_shape(tower.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"]))
    keys = {e.key for e in vit_entries(BEIT_TINY, "v", ())}
    assert keys == set(sd), "the BEiT-v2 layout must name exactly the golden vision_encoder keys"
    return tower, _params_from_torch(BEIT_TINY, sd, shapes), dict(np.load(GOLDEN_X2VLM / "ref_outputs.npz"))


def test_beit_v2_matches_golden_image_embeds(golden_beit):
    tower, params, ref = golden_beit
    image = jnp.transpose(jnp.asarray(ref["img_image"]), (0, 2, 3, 1))
    out = jax.jit(lambda p, x: tower.apply({"params": p}, x))(params, image)
    assert out.shape == (4, 197, 128)
    # measured max |diff| 5.5e-6 (values up to 4.3)
    np.testing.assert_allclose(np.asarray(out), ref["img_image_embeds"], atol=1e-5, rtol=0)


def test_beit_v2_region_pooling_matches_golden(golden_beit):
    """Region rows: the image of each row, token 0 = the mean of the patch tokens weighted by the region mask."""
    tower, params, ref = golden_beit
    images = jnp.transpose(jnp.asarray(ref["reg_image"]), (0, 2, 3, 1))[ref["reg_idx_to_group_img"]]
    weights = jnp.asarray(ref["reg_image_atts"][:, 1:], jnp.float32)
    fn = jax.jit(lambda p, x, w: tower.apply({"params": p}, x, w))
    np.testing.assert_allclose(np.asarray(fn(params, images, weights)), ref["reg_image_embeds"], atol=1e-5, rtol=0)
    full = jax.jit(lambda p, x: tower.apply({"params": p}, x))(params, images)
    np.testing.assert_allclose(np.asarray(full), ref["reg_image_embeds_fullatts"], atol=1e-5, rtol=0)


def _dinov2_reference(sd: dict, image: np.ndarray, v) -> np.ndarray:
    """HF `Dinov2Model.last_hidden_state` on timm-named weights: conv patches, CLS, bicubic-resized absolute
    positions, pre-LN blocks with layer scale, final LayerNorm. image NCHW."""
    t = {k: torch.from_numpy(np.asarray(a)) for k, a in sd.items()}
    x = F.conv2d(torch.from_numpy(image), t["v.patch_embed.proj.weight"], t["v.patch_embed.proj.bias"],
                 stride=v.patch_size).flatten(2).transpose(1, 2)
    b, n, d = x.shape
    x = torch.cat([t["v.cls_token"].expand(b, -1, -1), x], 1)
    pos = t["v.pos_embed"]
    grid = v.image_res // v.patch_size
    patch_pos = pos[:, 1:].reshape(1, v.pos_grid, v.pos_grid, d).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    x = x + torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, d)], 1)
    heads, hd = v.num_heads, d // v.num_heads
    for i in range(v.depth):
        p = f"v.blocks.{i}."
        h = F.layer_norm(x, (d,), t[p + "norm1.weight"], t[p + "norm1.bias"], v.layer_norm_eps)
        qkv = F.linear(h, t[p + "attn.qkv.weight"], t[p + "attn.qkv.bias"]).reshape(b, n + 1, 3, heads, hd)
        q, k, val = qkv.permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, -1) @ val
        att = F.linear(att.transpose(1, 2).reshape(b, n + 1, d), t[p + "attn.proj.weight"], t[p + "attn.proj.bias"])
        x = x + t[p + "gamma_1"] * att
        h = F.layer_norm(x, (d,), t[p + "norm2.weight"], t[p + "norm2.bias"], v.layer_norm_eps)
        h = F.linear(F.gelu(F.linear(h, t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"])),
                     t[p + "mlp.fc2.weight"], t[p + "mlp.fc2.bias"])
        x = x + t[p + "gamma_2"] * h
    return F.layer_norm(x, (d,), t["v.norm.weight"], t["v.norm.bias"], v.layer_norm_eps).numpy()


@pytest.mark.parametrize("scan", [False, True])
def test_dinov2_matches_torch_reference(scan):
    """Stored grid 5 resized to the run's 4x4 grid; token 0 = CLS output; scanned blocks give the same numbers."""
    rng = np.random.default_rng(1)
    tower = _tower(DINO_TINY, scan_layers=scan)
    shapes = nn.meta.unbox(jax.eval_shape(tower.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"])
    params = jax.tree.map(lambda s: (0.2 * rng.normal(size=s.shape) + (1.0 if s.ndim == 1 else 0.0)).astype(
        np.float32), shapes)
    assert params["pos_embed"].shape == (1, 26, 32)
    sd = {e.key: to_torch_array(e, _get(params, e.path)) for e in vit_entries(DINO_TINY, "v", ())}
    image = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    out = jax.jit(lambda p, x: tower.apply({"params": p}, x))(params, jnp.transpose(image, (0, 2, 3, 1)))
    assert out.shape == (2, 17, 32)
    # measured max |diff| 1.3e-6 (float32 einsums vs torch matmuls)
    np.testing.assert_allclose(np.asarray(out), _dinov2_reference(sd, image, DINO_TINY), atol=3e-6, rtol=0)
