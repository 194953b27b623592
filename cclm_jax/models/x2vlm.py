"""CCLM-X2VLM (X2-VLM's `CrossViewLM`): ViT image tower, XLM-R text encoder, separate BERT cross encoder.

Differences from `CCLM` (whose public methods it keeps, so the objectives and tasks apply unchanged):
- `vision_encoder`: `models.vit.VisionTransformer` (BEiT-v2 with mean pooling for the released checkpoints);
  `encode_image(image, patch_weights=None)`: with patch_weights (B, G^2) token 0 is the region-weighted mean.
- `text_encoder`: a full XLM-R (`model.text`, every layer self-attention only, RoBERTa position ids from
  pad_token_id + 1, LayerNorm eps 1e-5): `encode_text` runs all of it.
- `cross_encoder`: `model.cross.num_layers` BERT layers, each self-attention -> cross-attention -> FFN, no
  embeddings, LayerNorm eps `model.cross.layer_norm_eps` (1e-12); masks -10000 (self) / -1e9 (cross).
  `fuse` / `cross_kv` use it; the parallel-text view feeds sentence states to the image key/value projections.
- `mlm_head`: transform (eps `model.text.layer_norm_eps`) + an untied decoder (V, D) + bias, on the cross
  encoder's outputs. No TLM (`tlm_hidden` raises).
Parameter tree: `vision_encoder`, `text_encoder/{embeddings, layer_i}`, `cross_encoder/layer_i`, `mlm_head/{transform,
bias, decoder}`, `text_proj`, `vision_proj`, `itm_head`, `bbox_head`, `temp` (torch names: `interop.layout`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from cclm_jax.models.cclm import CCLM, DTYPES, to_nhwc, vision_tower, vision_width
from cclm_jax.models.common import param_with_axes
from cclm_jax.models.heads import MLMHead, MLPHead
from cclm_jax.models.text import TextStack


class X2VLM(CCLM):
    """CCLM-X2VLM; `config` is the `model` ConfigDict with `vision.kind = 'vit'` and a `cross` section."""

    def setup(self):
        cfg = self.config
        t, c = cfg.text, cfg.cross
        dtype = DTYPES[cfg.dtype]
        common = dict(dropout=t.hidden_dropout, attention_dropout=t.attention_dropout, remat=cfg.remat,
                      deterministic=self.deterministic, dtype=dtype, attention_impl=cfg.get("attention_impl", "xla"),
                      scan_layers=cfg.get("scan_layers", False))
        self.vision_encoder = vision_tower(cfg, self.deterministic)
        self.text_encoder = TextStack(
            vocab_size=t.vocab_size, hidden=t.hidden_size, num_heads=t.num_heads, intermediate=t.intermediate_size,
            num_layers=t.num_layers, fusion_layer=t.num_layers, max_positions=t.max_position_embeddings,
            type_vocab_size=t.type_vocab_size, eps=t.layer_norm_eps, roberta_pad_id=t.pad_token_id, **common)
        self.cross_encoder = TextStack(
            vocab_size=0, hidden=t.hidden_size, num_heads=c.num_heads, intermediate=c.intermediate_size,
            num_layers=c.num_layers, fusion_layer=0, max_positions=0, type_vocab_size=0, eps=c.layer_norm_eps,
            **common)
        self.mlm_head = MLMHead(t.vocab_size, t.layer_norm_eps, dtype, tied=False, hidden=t.hidden_size)
        self.text_proj = self._projection(t.hidden_size)
        self.vision_proj = self._projection(vision_width(cfg))
        self.itm_head = MLPHead(2, dtype)
        self.bbox_head = MLPHead(4, dtype)
        self.temp = param_with_axes(self, "temp", nn.initializers.constant(cfg.temp), (), ())

    def encode_image(self, image: jax.Array, patch_weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        embeds = self.vision_encoder(to_nhwc(image), patch_weights)
        return embeds, jnp.ones(embeds.shape[:2], jnp.int32)

    def cross_kv(self, cond_embeds: jax.Array) -> tuple[tuple[jax.Array, jax.Array], ...]:
        return self.cross_encoder.cross_key_values(cond_embeds)

    def fuse(self, cond_embeds: jax.Array | tuple, cond_atts: jax.Array, text_embeds: jax.Array,
             text_atts: jax.Array) -> jax.Array:
        return self.cross_encoder.fuse(text_embeds, text_atts, cond_embeds, cond_atts)

    def mlm_hidden(self, ids_masked: jax.Array, atts: jax.Array, cond_embeds: jax.Array | tuple,
                   cond_atts: jax.Array, masked_pos: jax.Array) -> jax.Array:
        hidden = self.fuse(cond_embeds, cond_atts, self.encode_text(ids_masked, atts), atts)
        gathered = jnp.take_along_axis(hidden, masked_pos[..., None].astype(jnp.int32), axis=1)
        return self.mlm_head.transform(gathered)

    def tlm_hidden(self, ids_masked: jax.Array, atts: jax.Array, masked_pos: jax.Array) -> jax.Array:
        raise ValueError("CCLM-X2VLM has no translation LM (objectives.use_tlm): its cross encoder needs a condition")

    def mlm_decode(self, hidden: jax.Array) -> jax.Array:
        return self.mlm_head.decode(hidden)
