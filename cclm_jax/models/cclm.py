"""The CCLM model: Swin (or ViT) image tower, XLM-R text/fusion stack, projections and heads (Flax Linen).

`build_model` returns this module, or its CCLM-X2VLM subclass (`models.x2vlm`) for a config with a `cross`
section; both have the methods below.

Public methods (use with `model.apply({'params': params}, ..., method=model.<name>)`):
- `encode_image(image) -> (image_embeds (B, Ni, D), image_atts (B, Ni) int32 ones)`; `image` is a float
  image normalised with the CLIP statistics, NHWC (B, H, W, 3) or NCHW (B, 3, H, W) as in PyTorch (the
  layout is recognised from which axis has 3 channels).
- `encode_text(ids, atts) -> text_embeds (B, L, D)`: the text encoder (layers [0, fusion_layer)).
- `features(image_embeds, text_embeds) -> (image_feat, text_feat)`, each (B, embed_dim), L2-normalised
  projections of token 0; `image_features`, `text_features` compute one side (both sentences of a
  parallel pair use `text_features`).
- `fuse(cond_embeds, cond_atts, text_embeds, text_atts) -> (B, L, D)`: the fusion layers cross-attending
  to `cond` (image tokens or the other sentence's text-encoder states).
- `cross_kv(cond_embeds) -> ((keys, values), ...)`: per fusion layer, the cross-attention projections of a
  condition, each (B, Lc, nH, hd); `fuse` and `mlm_hidden` accept it in place of `cond_embeds` (computed
  once, shared by several fusion passes; gather its leaves along axis 0 to pick other examples' conditions).
- `itm_logits(cls) -> (B, 2)`; `bbox(cls) -> (B, 4)` in [0, 1] (cx, cy, w, h).
- `mlm_hidden(ids_masked, atts, cond_embeds, cond_atts, masked_pos) -> (B, M, D)`: all layers, hidden states
  gathered at `masked_pos` (B, M) and passed through the MLM transform; `mlm_decode(hidden) -> (B, M, V)`;
  `mlm_logits(...)` = both.
- `tlm_hidden(ids_masked, atts, masked_pos) -> (B, M, D)`: all layers over a concatenated sentence pair.
- `temperature() -> ()`: the contrastive temperature clamped to [0.001, 0.5].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from cclm_jax.models.common import DenseGeneral, param_with_axes
from cclm_jax.models.heads import MLMHead, MLPHead, torch_linear_bias_init, torch_linear_kernel_init
from cclm_jax.models.swin import SwinTransformer
from cclm_jax.models.text import TextStack
from cclm_jax.models.vit import VisionTransformer

TEMP_MIN, TEMP_MAX = 0.001, 0.5
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||_2, eps) over the last axis (torch.nn.functional.normalize), in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def to_nhwc(image: jax.Array) -> jax.Array:
    """Accept NCHW (PyTorch) or NHWC images; return NHWC."""
    if image.ndim != 4:
        raise ValueError(f"image must be 4-D (B, H, W, 3) or (B, 3, H, W), got shape {image.shape}")
    if image.shape[-1] == 3:
        return image
    if image.shape[1] == 3:
        return jnp.transpose(image, (0, 2, 3, 1))
    raise ValueError(f"image must have 3 channels in axis 1 or 3, got shape {image.shape}")


class CCLM(nn.Module):
    """Cross-View Language Model. `config` is the `model` ConfigDict (see `configs/cclm_base.py`)."""

    config: ml_collections.ConfigDict
    deterministic: bool = True

    def setup(self):
        cfg = self.config
        t = cfg.text
        dtype = DTYPES[cfg.dtype]
        self.vision_encoder = vision_tower(cfg, self.deterministic)
        self.text_encoder = TextStack(
            vocab_size=t.vocab_size, hidden=t.hidden_size, num_heads=t.num_heads,
            intermediate=t.intermediate_size, num_layers=t.num_layers, fusion_layer=t.fusion_layer,
            max_positions=t.max_position_embeddings, type_vocab_size=t.type_vocab_size,
            dropout=t.hidden_dropout, attention_dropout=t.attention_dropout, eps=t.layer_norm_eps,
            remat=cfg.remat, deterministic=self.deterministic, dtype=dtype,
            attention_impl=cfg.get("attention_impl", "xla"), scan_layers=cfg.get("scan_layers", False))
        self.mlm_head = MLMHead(t.vocab_size, t.layer_norm_eps, dtype)
        self.text_proj = self._projection(t.hidden_size)
        self.vision_proj = self._projection(vision_width(cfg))
        self.itm_head = MLPHead(2, dtype)
        self.bbox_head = MLPHead(4, dtype)
        self.temp = param_with_axes(self, "temp", nn.initializers.constant(cfg.temp), (), ())

    def _projection(self, in_features: int) -> DenseGeneral:
        return DenseGeneral(self.config.embed_dim, axes=("embed", None), dtype=jnp.float32,
                            kernel_init=torch_linear_kernel_init(),
                            bias_init=torch_linear_bias_init(in_features))

    def __call__(self, image: jax.Array, ids: jax.Array, atts: jax.Array) -> dict:
        """Touch every parameter once (used by `init`); returns the main outputs."""
        image_embeds, image_atts = self.encode_image(image)
        text_embeds = self.encode_text(ids, atts)
        image_feat, text_feat = self.features(image_embeds, text_embeds)
        cross = self.fuse(image_embeds, image_atts, text_embeds, atts)
        masked_pos = jnp.zeros((ids.shape[0], 1), jnp.int32)
        return {
            "image_feat": image_feat, "text_feat": text_feat,
            "itm_logits": self.itm_logits(cross[:, 0]), "bbox": self.bbox(cross[:, 0]),
            "mlm_logits": self.mlm_logits(ids, atts, image_embeds, image_atts, masked_pos),
            "temp": self.temperature(),
        }

    def encode_image(self, image: jax.Array) -> tuple[jax.Array, jax.Array]:
        embeds = self.vision_encoder(to_nhwc(image))
        if self.config.vision.get("frozen", False):  # a locked image tower (LiT): no gradient flows into it
            embeds = jax.lax.stop_gradient(embeds)
        return embeds, jnp.ones(embeds.shape[:2], jnp.int32)

    def encode_text(self, ids: jax.Array, atts: jax.Array) -> jax.Array:
        embeds = self.text_encoder.encode(ids, atts)
        if self.config.text.get("pool", "cls") == "mean":  # the CLS slot carries the sentence's mean state
            weights = atts[..., None].astype(embeds.dtype)
            mean = (embeds * weights).sum(1) / jnp.maximum(weights.sum(1), 1)
            embeds = embeds.at[:, 0].set(mean)
        return embeds

    def image_features(self, image_embeds: jax.Array) -> jax.Array:
        return l2_normalize(self.vision_proj(image_embeds[:, 0].astype(jnp.float32)))

    def text_features(self, text_embeds: jax.Array) -> jax.Array:
        return l2_normalize(self.text_proj(text_embeds[:, 0].astype(jnp.float32)))

    def features(self, image_embeds: jax.Array, text_embeds: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.image_features(image_embeds), self.text_features(text_embeds)

    def cross_kv(self, cond_embeds: jax.Array) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """Per fusion layer, the cross-attention (keys, values) of a condition; accepted as `cond_embeds`."""
        return self.text_encoder.cross_key_values(cond_embeds)

    def fuse(self, cond_embeds: jax.Array | tuple, cond_atts: jax.Array, text_embeds: jax.Array,
             text_atts: jax.Array) -> jax.Array:
        return self.text_encoder.fuse(text_embeds, text_atts, cond_embeds, cond_atts)

    def itm_logits(self, cls: jax.Array) -> jax.Array:
        return self.itm_head(cls)

    def bbox(self, cls: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(self.bbox_head(cls))

    def mlm_hidden(self, ids_masked: jax.Array, atts: jax.Array, cond_embeds: jax.Array | tuple,
                   cond_atts: jax.Array, masked_pos: jax.Array) -> jax.Array:
        hidden = self.text_encoder.fuse(self.text_encoder.encode(ids_masked, atts), atts, cond_embeds,
                                        cond_atts)
        gathered = jnp.take_along_axis(hidden, masked_pos[..., None].astype(jnp.int32), axis=1)
        return self.mlm_head.transform(gathered)

    def tlm_hidden(self, ids_masked: jax.Array, atts: jax.Array, masked_pos: jax.Array) -> jax.Array:
        """Translation LM: all layers over a concatenated pair, no condition; (B, M, D) at masked_pos."""
        hidden = self.text_encoder.encode_all(ids_masked, atts)
        gathered = jnp.take_along_axis(hidden, masked_pos[..., None].astype(jnp.int32), axis=1)
        return self.mlm_head.transform(gathered)

    def mlm_decode(self, hidden: jax.Array) -> jax.Array:
        logits = self.text_encoder.attend(hidden) + self.mlm_head.bias.astype(hidden.dtype)
        return logits.astype(jnp.float32)

    def mlm_logits(self, ids_masked: jax.Array, atts: jax.Array, cond_embeds: jax.Array,
                   cond_atts: jax.Array, masked_pos: jax.Array) -> jax.Array:
        return self.mlm_decode(self.mlm_hidden(ids_masked, atts, cond_embeds, cond_atts, masked_pos))

    def temperature(self) -> jax.Array:
        """The temperature clamped to [0.001, 0.5], with an identity gradient (straight-through).

        The reference clamps the parameter in place before every forward and then uses it, so its
        gradient is never cut at the bounds; the train step writes the clamp back to the parameter.
        """
        return self.temp + jax.lax.stop_gradient(jnp.clip(self.temp, TEMP_MIN, TEMP_MAX) - self.temp)


def vision_kind(model_config: ml_collections.ConfigDict) -> str:
    """'swin' (CCLM's tower; the default) or 'vit' (BEiT-v2 / DINOv2, `models.vit`)."""
    return model_config.vision.get("kind", "swin")


def vision_width(model_config: ml_collections.ConfigDict) -> int:
    """Width of the image tokens: Swin embed_dim * 2^(stages-1), ViT embed_dim."""
    v = model_config.vision
    if vision_kind(model_config) == "vit":
        return v.embed_dim
    return v.embed_dim * 2 ** (len(v.depths) - 1)


def vision_stride(model_config: ml_collections.ConfigDict) -> int:
    """Pixels per side of one output patch token (the region patch masks' cell): ViT patch_size, Swin patch_size *
    2^(stages-1)."""
    v = model_config.vision
    if vision_kind(model_config) == "vit":
        return v.patch_size
    return v.patch_size * 2 ** (len(v.depths) - 1)


def vision_tower(model_config: ml_collections.ConfigDict, deterministic: bool) -> nn.Module:
    """The image tower of `model.vision` (module attribute `vision_encoder` of both model families)."""
    v, dtype, scan = model_config.vision, DTYPES[model_config.dtype], model_config.get("scan_layers", False)
    if vision_kind(model_config) == "vit":
        return VisionTransformer(
            image_res=v.image_res, patch_size=v.patch_size, width=v.embed_dim, depth=v.depth, num_heads=v.num_heads,
            mlp_ratio=v.mlp_ratio, qkv_bias=v.qkv_bias, rel_pos_bias=v.rel_pos_bias, pos_grid=v.pos_grid,
            layer_scale_init=v.layer_scale_init, pool=v.pool, eps=v.layer_norm_eps, drop_path_rate=v.drop_path_rate,
            remat=model_config.remat, deterministic=deterministic, dtype=dtype, scan_layers=scan)
    return SwinTransformer(
        image_res=v.image_res, patch_size=v.patch_size, embed_dim=v.embed_dim,
        depths=tuple(v.depths), num_heads=tuple(v.num_heads), window_size=v.window_size,
        mlp_ratio=v.mlp_ratio, drop_path_rate=v.drop_path_rate, remat=model_config.remat,
        deterministic=deterministic, dtype=dtype, scan_layers=scan, ape=v.get("ape", False))


def is_x2vlm(model_config: ml_collections.ConfigDict) -> bool:
    """Whether a `model` config is CCLM-X2VLM (a separate cross encoder: the `cross` section)."""
    return "cross" in model_config


def build_model(model_config: ml_collections.ConfigDict, deterministic: bool = True) -> CCLM:
    """The module for a `model` config (validated first): `CCLM`, or `x2vlm.X2VLM` when the config has a `cross`
    section (same public methods). `deterministic=False` enables dropout."""
    from cclm_jax.models.config import validate_model_config
    from cclm_jax.models.x2vlm import X2VLM

    validate_model_config(model_config)
    cls = X2VLM if is_x2vlm(model_config) else CCLM
    return cls(model_config, deterministic=deterministic)
