"""The CCLM pre-training model (official ``CrossViewLM`` layout) as a plain PyTorch module, inference only.

Parameter and buffer names equal the official state_dict keys, so ``load_state_dict(strict=True)``
accepts an official or exported checkpoint (see ``cclm_jax.torch.loading`` for files). All methods are
float32-exact ports of the reference; dropout and drop-path are absent (eval semantics).
"""
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cclm_jax.torch.config import validate_cclm_config
from cclm_jax.torch.swin import SwinTransformer
from cclm_jax.torch.text import TextEncoder

TEMP_MIN, TEMP_MAX = 0.001, 0.5  # the reference clamps the contrastive temperature to this range


def mlp_head(dim: int, out: int) -> nn.Sequential:
    """Linear(dim -> 2 dim) -> LayerNorm -> GELU -> Linear(2 dim -> out); keys ``0.*``, ``1.*``, ``3.*``."""
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim, eps=1e-5), nn.GELU(), nn.Linear(2 * dim, out))


class ContrastiveMatchingHeads(nn.Module):
    """What CCLM and CCLM-X2VLM share on top of their encoders: the ITC projections (``vision_proj``,
    ``text_proj``) and temperature, the ITM head and the bbox head. Subclasses set ``FAMILY`` (the name in
    error messages) and ``TIED_KEYS`` (state_dict keys that name one tensor twice: (key, twin))."""

    FAMILY = ""
    TIED_KEYS: tuple = ()

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, N, width) -> (B, embed_dim) unit-norm projection of token 0."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_features(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """(B, L, hidden) -> (B, embed_dim) unit-norm projection of token 0 (``<s>``)."""
        return F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

    def features(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image_feat, text_feat), each (B, embed_dim) unit norm."""
        return self.image_features(image_embeds), self.text_features(text_embeds)

    def contrastive_logits(self, feat_a: torch.Tensor, feat_b: torch.Tensor) -> torch.Tensor:
        """(Ba, D), (Bb, D) unit features -> (Ba, Bb) similarities divided by temp clamped to [0.001, 0.5]."""
        return feat_a @ feat_b.t() / self.temp.clamp(TEMP_MIN, TEMP_MAX)

    def itm_logits(self, cls: torch.Tensor) -> torch.Tensor:
        """cls (B, hidden) = fused token 0 -> (B, 2) logits (index 1 = matched)."""
        return self.itm_head(cls)

    def itm_scores(self, cls: torch.Tensor) -> torch.Tensor:
        """cls (B, hidden) -> (B,) probability that the pair matches."""
        return self.itm_logits(cls).softmax(dim=-1)[:, 1]

    def bbox(self, cls: torch.Tensor) -> torch.Tensor:
        """cls (B, hidden) = fused token 0 (text over the whole image) -> (B, 4) box (cx, cy, w, h) in [0, 1]
        (the official ``predict_bbox``)."""
        return self.bbox_head(cls).sigmoid()


class CCLM(ContrastiveMatchingHeads):
    """CCLM: Swin image encoder, 12-layer text/fusion stack, ITC projections, ITM and bbox heads, tied MLM head.

    ``config`` is the architecture dict documented in ``cclm_jax.torch.config``. Images are NCHW float32,
    pixels in [0, 1] normalised with the CLIP mean (0.48145466, 0.4578275, 0.40821073) and std
    (0.26862954, 0.26130258, 0.27577711); token ids and masks are (B, L) integer tensors. ``bbox_head``
    (the 4M region objective's box regressor) is kept so that official files load strictly."""

    FAMILY = "CCLM"
    # (key, its tied twin): the MLM decoder shares storage with the word embeddings and the prediction bias.
    TIED_KEYS = (
        ("text_encoder.bert.embeddings.word_embeddings.weight", "text_encoder.cls.predictions.decoder.weight"),
        ("text_encoder.cls.predictions.bias", "text_encoder.cls.predictions.decoder.bias"),
    )

    def __init__(self, config: Mapping):
        super().__init__()
        self.config = validate_cclm_config(config)
        hidden, embed_dim = self.config["text"]["hidden_size"], self.config["embed_dim"]
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.vision_encoder = SwinTransformer(self.config["vision"])
        self.text_encoder = TextEncoder(self.config["text"])
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.vision_proj = nn.Linear(self.vision_encoder.width, embed_dim)
        self.itm_head = mlp_head(hidden, 2)
        self.bbox_head = mlp_head(hidden, 4)

    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, 3, R, R) -> (image_embeds (B, 1 + (R/32)², width) float, image_atts (B, 1 + (R/32)²) int64
        ones); token 0 is the mean of the patch tokens."""
        embeds = self.vision_encoder(image)
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)

    def encode_text(self, ids: torch.Tensor, atts: torch.Tensor) -> torch.Tensor:
        """ids, atts (B, L) -> text_embeds (B, L, hidden): embeddings + the text-only layers."""
        return self.text_encoder.encode(ids, atts)

    def fuse(self, cond_embeds: torch.Tensor, cond_atts: torch.Tensor, text_embeds: torch.Tensor,
             text_atts: torch.Tensor) -> torch.Tensor:
        """Fusion layers: text_embeds (B, L, hidden) cross-attend to cond_embeds (B, Lc, hidden) (image tokens,
        or another sentence's text_embeds) -> (B, L, hidden)."""
        return self.text_encoder.fuse(cond_embeds, cond_atts, text_embeds, text_atts)

    def mlm_logits(self, ids_masked: torch.Tensor, atts: torch.Tensor, cond_embeds: torch.Tensor,
                   cond_atts: torch.Tensor, masked_pos: torch.Tensor) -> torch.Tensor:
        """All text layers on ids_masked (B, L), fusion layers conditioned on cond_embeds (B, Lc, hidden);
        hidden states at masked_pos (B, M) -> (B, M, vocab_size) logits (decoder tied to word embeddings)."""
        return self.text_encoder.mlm_logits(ids_masked, atts, cond_embeds, cond_atts, masked_pos)
