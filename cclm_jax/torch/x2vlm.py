"""CCLM-X2VLM (X2-VLM's ``CrossViewLM``) as a plain PyTorch module, inference only.

ViT image encoder (``cclm_jax.torch.vit``: BEiT-v2 in the released model), an XLM-R text encoder
(``text_encoder.*``: RobertaModel without pooler, every layer self-attention only, RoBERTa position ids),
a separate BERT cross encoder (``cross_encoder.encoder.layer.*``: self-attention -> cross-attention -> FFN,
no embeddings, LayerNorm eps ``cross.layer_norm_eps``, 1e-12), the ITC projections, ITM and bbox heads and an
MLM head with its own decoder (``mlm_head.predictions.*``, not tied to the word embeddings). Parameter and
buffer names equal the official state_dict keys, so ``load_state_dict(strict=True)`` takes an official or
exported checkpoint. Float32-exact ports of the reference; dropout and drop-path are absent (eval semantics).
Masks: -10000 on padded keys in self-attention, -1e9 in cross-attention (HF ``invert_attention_mask``, float32).
"""
from collections.abc import Mapping

import torch
from torch import nn

from cclm_jax.torch.config import validate_x2vlm_config
from cclm_jax.torch.model import ContrastiveMatchingHeads, mlp_head
from cclm_jax.torch.text import (
    CROSS_MASK_VALUE,
    SELF_MASK_VALUE,
    Embeddings,
    Encoder,
    MLMHead,
    additive_mask,
)
from cclm_jax.torch.vit import VisionTransformer


def roberta_position_ids(ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """RoBERTa / XLM-R position ids (HF ``create_position_ids_from_input_ids``): real tokens count up from
    pad_token_id + 1, pads keep pad_token_id; (B, L) -> (B, L) int64."""
    real = ids.ne(pad_token_id).int()
    return (torch.cumsum(real, dim=1).type_as(real) * real).long() + pad_token_id


class RobertaEmbeddings(Embeddings):
    """word + token_type[0] + position (RoBERTa ids from the pad token) -> LayerNorm."""

    def __init__(self, text: Mapping):
        super().__init__(text)
        self.pad_token_id = text["pad_token_id"]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) int -> (B, L, hidden)."""
        x = self.word_embeddings(ids) + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings(roberta_position_ids(ids, self.pad_token_id))
        return self.LayerNorm(x)


def run_layers(layers: nn.ModuleList, x: torch.Tensor, atts: torch.Tensor, cond: torch.Tensor | None = None,
               cond_atts: torch.Tensor | None = None) -> torch.Tensor:
    """Post-LN BERT layers over x (B, L, H) with key mask atts (B, L); cross-attention layers attend to cond
    (B, Lc, H) with mask cond_atts (B, Lc)."""
    self_mask = additive_mask(atts, SELF_MASK_VALUE, x.dtype)
    cross_mask = None if cond is None else additive_mask(cond_atts, CROSS_MASK_VALUE, x.dtype)
    for layer in layers:
        x = layer(x, self_mask, cond, cross_mask)
    return x


class TextEncoder(nn.Module):
    """XLM-R: ``embeddings`` + ``encoder.layer.*`` (self-attention only); ``text`` is the validated section."""

    def __init__(self, text: Mapping):
        super().__init__()
        self.max_tokens = text["max_position_embeddings"] - text["pad_token_id"] - 1
        self.embeddings = RobertaEmbeddings(text)
        self.encoder = Encoder({**text, "scale_query_first": True})  # as X2-VLM's models/xroberta.py

    def forward(self, ids: torch.Tensor, atts: torch.Tensor) -> torch.Tensor:
        """ids, atts (B, L) -> (B, L, hidden): every position, pads included."""
        if atts.ndim != 2 or tuple(atts.shape) != tuple(ids.shape):
            raise ValueError(f"text attention mask: expected shape {tuple(ids.shape)}, got {tuple(atts.shape)}")
        if ids.shape[1] > self.max_tokens:
            raise ValueError(f"text: {ids.shape[1]} tokens exceed the {self.max_tokens} positions of "
                             f"max_position_embeddings (RoBERTa positions start after the pad id)")
        return run_layers(self.encoder.layer, self.embeddings(ids), atts)


class CrossEncoder(nn.Module):
    """X2-VLM's cross encoder: ``encoder.layer.*``, each self-attention -> cross-attention -> FFN, no embeddings."""

    def __init__(self, text: Mapping, cross: Mapping):
        super().__init__()
        self.encoder = Encoder({"hidden_size": text["hidden_size"], "num_heads": cross["num_heads"],
                                "intermediate_size": cross["intermediate_size"],
                                "layer_norm_eps": cross["layer_norm_eps"], "num_layers": cross["num_layers"],
                                "fusion_layer": 0})

    def forward(self, text_embeds: torch.Tensor, text_atts: torch.Tensor, cond: torch.Tensor,
                cond_atts: torch.Tensor) -> torch.Tensor:
        for name, embeds, atts in (("text_embeds", text_embeds, text_atts), ("condition", cond, cond_atts)):
            if atts.ndim != 2 or tuple(atts.shape) != tuple(embeds.shape[:2]):
                raise ValueError(f"{name} attention mask: expected shape {tuple(embeds.shape[:2])}, "
                                 f"got {tuple(atts.shape)}")
        return run_layers(self.encoder.layer, text_embeds, text_atts, cond, cond_atts)


class X2VLM(ContrastiveMatchingHeads):
    """CCLM-X2VLM with the public methods of ``cclm_jax.torch.CCLM`` (encode_image, encode_text, features,
    contrastive_logits, fuse, itm_logits / itm_scores, bbox, mlm_logits).

    ``config``: the CCLM-X2VLM architecture dict (``cclm_jax.torch.config.validate_x2vlm_config``). Images are
    NCHW float32 normalised with the CLIP mean / std (as CCLM); token ids and masks (B, L) integer tensors with
    XLM-R ids (``<s>`` = 0, ``<pad>`` = ``text.pad_token_id`` = 1, ``</s>`` = 2)."""

    FAMILY = "CCLM-X2VLM"
    TIED_KEYS = (("mlm_head.predictions.bias", "mlm_head.predictions.decoder.bias"),)

    def __init__(self, config: Mapping):
        super().__init__()
        self.config = validate_x2vlm_config(config)
        text, embed_dim = self.config["text"], self.config["embed_dim"]
        hidden = text["hidden_size"]
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.vision_encoder = VisionTransformer(self.config["vision"])
        self.text_encoder = TextEncoder(text)
        self.cross_encoder = CrossEncoder(text, self.config["cross"])
        self.vision_proj = nn.Linear(self.vision_encoder.width, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = mlp_head(hidden, 2)
        self.bbox_head = mlp_head(hidden, 4)
        self.mlm_head = MLMHead(text, None)

    def encode_image(self, image: torch.Tensor,
                     patch_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, 3, R, R) -> (image_embeds (B, 1 + G², width), image_atts (B, 1 + G²) int64 ones), G = R / patch.

        Token 0 is the mean of the normalised patch tokens (BEiT-v2) or the CLS output (DINOv2). Region rows
        (X2-VLM's region view): ``patch_weights`` (B, G²), e.g. ``region_atts[:, 1:]``, makes token 0 the
        weighted mean; pass the region mask ``region_atts`` (B, 1 + G²) as the condition mask of ``fuse``."""
        embeds = self.vision_encoder(image, patch_weights)
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)

    def encode_text(self, ids: torch.Tensor, atts: torch.Tensor) -> torch.Tensor:
        """ids, atts (B, L) -> text_embeds (B, L, hidden): the whole XLM-R text encoder."""
        return self.text_encoder(ids, atts)

    def fuse(self, cond_embeds: torch.Tensor, cond_atts: torch.Tensor, text_embeds: torch.Tensor,
             text_atts: torch.Tensor) -> torch.Tensor:
        """Cross encoder: text_embeds (B, L, hidden) cross-attend to cond_embeds (B, Lc, hidden) (image tokens,
        or another sentence's text_embeds) -> (B, L, hidden)."""
        return self.cross_encoder(text_embeds, text_atts, cond_embeds, cond_atts)

    def mlm_logits(self, ids_masked: torch.Tensor, atts: torch.Tensor, cond_embeds: torch.Tensor,
                   cond_atts: torch.Tensor, masked_pos: torch.Tensor) -> torch.Tensor:
        """Text encoder on ids_masked (B, L), cross encoder conditioned on cond_embeds (B, Lc, hidden); hidden
        states at masked_pos (B, M) -> (B, M, vocab_size) logits (the MLM head's own decoder)."""
        if masked_pos.ndim != 2 or masked_pos.shape[0] != ids_masked.shape[0]:
            raise ValueError(f"masked_pos: expected shape ({ids_masked.shape[0]}, M), got {tuple(masked_pos.shape)}")
        hidden = self.fuse(cond_embeds, cond_atts, self.encode_text(ids_masked, atts), atts)
        gathered = torch.gather(hidden, 1, masked_pos[:, :, None].expand(-1, -1, hidden.shape[-1]))
        return self.mlm_head.predictions(gathered)
