"""XLM-R/BERT post-LN text stack of CCLM with fusion (cross-attention) layers and the tied MLM head
(eval mode: no dropout).

Submodule and buffer names follow the official ``text_encoder.*`` state_dict keys. Token ids and
attention masks are (B, L) integer tensors (masks 1 = attend, 0 = padding); hidden states are
(B, L, hidden_size) floats.
"""
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

SELF_MASK_VALUE = -10000.0  # added to attention scores of padded keys in self-attention
CROSS_MASK_VALUE = -1e9  # same for cross-attention (HF ``invert_attention_mask`` in float32)


def additive_mask(atts: torch.Tensor, value: float, dtype: torch.dtype) -> torch.Tensor:
    """(B, Lk) 1/0 mask -> (B, 1, 1, Lk) additive mask ``(1 - m) * value`` in ``dtype``."""
    return (1.0 - atts[:, None, None, :].to(dtype)) * value


class Embeddings(nn.Module):
    """word + token_type[0] + position (ids 0..L-1, BERT convention) -> LayerNorm."""

    def __init__(self, text: Mapping):
        super().__init__()
        self.register_buffer("position_ids", torch.arange(text["max_position_embeddings"])[None, :])
        self.word_embeddings = nn.Embedding(text["vocab_size"], text["hidden_size"])
        self.position_embeddings = nn.Embedding(text["max_position_embeddings"], text["hidden_size"])
        self.token_type_embeddings = nn.Embedding(text["type_vocab_size"], text["hidden_size"])
        self.LayerNorm = nn.LayerNorm(text["hidden_size"], eps=text["layer_norm_eps"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) int -> (B, L, hidden)."""
        positions = self.position_ids[:, :ids.shape[1]]
        x = self.word_embeddings(ids) + self.token_type_embeddings.weight[0] + self.position_embeddings(positions)
        return self.LayerNorm(x)


class MultiHeadProjections(nn.Module):
    """Scaled dot-product attention; ``key``/``value`` read the context (itself, or the condition).

    ``scale_query_first``: divide q by sqrt(head_dim) before q.k^T (X2-VLM's XLM-R text encoder) instead of the
    scores after it (BERT); the same maths, rounded differently in float32."""

    def __init__(self, hidden: int, num_heads: int, scale_query_first: bool = False):
        super().__init__()
        self.num_heads, self.scale_query_first = num_heads, scale_query_first
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.reshape(b, length, self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, Lq, H), context (B, Lk, H), mask (B, 1, 1, Lk) additive -> (B, Lq, H)."""
        q, k, v = self._heads(self.query(x)), self._heads(self.key(context)), self._heads(self.value(context))
        if self.scale_query_first:
            scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1) + mask
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + mask
        out = scores.softmax(dim=-1) @ v
        return out.transpose(1, 2).reshape(x.shape)


class ResidualOutput(nn.Module):
    """LayerNorm(residual + dense(x)) (post-LN)."""

    def __init__(self, in_dim: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_dim, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dense(x))


class Attention(nn.Module):
    """Attention block: ``self`` (q/k/v projections) then ``output`` (dense, residual, LayerNorm)."""

    def __init__(self, text: Mapping):
        super().__init__()
        hidden = text["hidden_size"]
        self.self = MultiHeadProjections(hidden, text["num_heads"],  # official key name "self"
                                         text.get("scale_query_first", False))
        self.output = ResidualOutput(hidden, hidden, text["layer_norm_eps"])

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, context, mask), x)


class Intermediate(nn.Module):
    """dense(hidden -> intermediate) -> exact GELU."""

    def __init__(self, text: Mapping):
        super().__init__()
        self.dense = nn.Linear(text["hidden_size"], text["intermediate_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    """Self-attention -> (fusion layers only) cross-attention -> feed-forward; each residual + LayerNorm."""

    def __init__(self, text: Mapping, cross: bool):
        super().__init__()
        self.attention = Attention(text)
        self.crossattention = Attention(text) if cross else None
        self.intermediate = Intermediate(text)
        self.output = ResidualOutput(text["intermediate_size"], text["hidden_size"], text["layer_norm_eps"])

    def forward(self, x: torch.Tensor, self_mask: torch.Tensor, cond: torch.Tensor | None,
                cross_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, x, self_mask)
        if self.crossattention is not None:
            x = self.crossattention(x, cond, cross_mask)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    """``layer.0 .. layer.{num_layers-1}``; layers from ``fusion_layer`` on carry cross-attention."""

    def __init__(self, text: Mapping):
        super().__init__()
        self.layer = nn.ModuleList(Layer(text, cross=i >= text["fusion_layer"]) for i in range(text["num_layers"]))


class Bert(nn.Module):
    """Embeddings + encoder layers (no pooler)."""

    def __init__(self, text: Mapping):
        super().__init__()
        self.embeddings = Embeddings(text)
        self.encoder = Encoder(text)


class PredictionTransform(nn.Module):
    """dense -> exact GELU -> LayerNorm."""

    def __init__(self, text: Mapping):
        super().__init__()
        self.dense = nn.Linear(text["hidden_size"], text["hidden_size"])
        self.LayerNorm = nn.LayerNorm(text["hidden_size"], eps=text["layer_norm_eps"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPredictionHead(nn.Module):
    """transform -> decoder (weight = word embeddings, or its own when ``word_embeddings`` is None as in
    CCLM-X2VLM; bias = ``bias``); both tied copies stay in the state_dict."""

    def __init__(self, text: Mapping, word_embeddings: nn.Embedding | None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(text["vocab_size"]))
        self.transform = PredictionTransform(text)
        self.decoder = nn.Linear(text["hidden_size"], text["vocab_size"])
        if word_embeddings is not None:
            self.decoder.weight = word_embeddings.weight
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., vocab_size) logits."""
        return self.decoder(self.transform(x))


class MLMHead(nn.Module):
    """Holds ``predictions`` (official key ``cls.predictions``)."""

    def __init__(self, text: Mapping, word_embeddings: nn.Embedding | None):
        super().__init__()
        self.predictions = LMPredictionHead(text, word_embeddings)


class TextEncoder(nn.Module):
    """The CCLM text stack (12 layers in CCLM): layers [0, fusion_layer) encode text, the rest fuse a condition
    (image tokens or another sentence's text states) through cross-attention. ``text`` is the validated
    ``config['text']`` section."""

    def __init__(self, text: Mapping):
        super().__init__()
        self.fusion_layer, self.max_positions = text["fusion_layer"], text["max_position_embeddings"]
        self.bert = Bert(text)
        self.cls = MLMHead(text, self.bert.embeddings.word_embeddings)

    def _check_text(self, ids_or_embeds: torch.Tensor, atts: torch.Tensor, name: str) -> None:
        if atts.ndim != 2 or tuple(atts.shape) != tuple(ids_or_embeds.shape[:2]):
            raise ValueError(f"{name} attention mask: expected shape {tuple(ids_or_embeds.shape[:2])}, "
                             f"got {tuple(atts.shape)}")
        if ids_or_embeds.shape[1] > self.max_positions:
            raise ValueError(f"{name}: {ids_or_embeds.shape[1]} tokens exceed max_position_embeddings "
                             f"{self.max_positions}")

    def _run(self, x: torch.Tensor, atts: torch.Tensor, layers: range, cond: torch.Tensor | None,
             cond_atts: torch.Tensor | None) -> torch.Tensor:
        self_mask = additive_mask(atts, SELF_MASK_VALUE, x.dtype)
        cross_mask = None
        if cond is not None:
            if cond_atts.ndim != 2 or tuple(cond_atts.shape) != tuple(cond.shape[:2]):
                raise ValueError(f"condition attention mask: expected shape {tuple(cond.shape[:2])}, "
                                 f"got {tuple(cond_atts.shape)}")
            cross_mask = additive_mask(cond_atts, CROSS_MASK_VALUE, x.dtype)
        for i in layers:
            x = self.bert.encoder.layer[i](x, self_mask, cond, cross_mask)
        return x

    def encode(self, ids: torch.Tensor, atts: torch.Tensor) -> torch.Tensor:
        """Text-only layers: ids, atts (B, L) -> (B, L, hidden)."""
        self._check_text(ids, atts, "text")
        return self._run(self.bert.embeddings(ids), atts, range(self.fusion_layer), None, None)

    def fuse(self, cond: torch.Tensor, cond_atts: torch.Tensor, text_embeds: torch.Tensor,
             text_atts: torch.Tensor) -> torch.Tensor:
        """Fusion layers over text-layer states (B, L, hidden), cross-attending to cond (B, Lc, hidden)."""
        self._check_text(text_embeds, text_atts, "text_embeds")
        return self._run(text_embeds, text_atts, range(self.fusion_layer, len(self.bert.encoder.layer)),
                         cond, cond_atts)

    def mlm_logits(self, ids: torch.Tensor, atts: torch.Tensor, cond: torch.Tensor, cond_atts: torch.Tensor,
                   masked_pos: torch.Tensor) -> torch.Tensor:
        """All layers on masked ids (B, L) conditioned on cond; hidden states gathered at masked_pos (B, M)
        -> (B, M, vocab_size) logits."""
        self._check_text(ids, atts, "masked text")
        if masked_pos.ndim != 2 or masked_pos.shape[0] != ids.shape[0]:
            raise ValueError(f"masked_pos: expected shape ({ids.shape[0]}, M), got {tuple(masked_pos.shape)}")
        hidden = self._run(self.bert.embeddings(ids), atts, range(len(self.bert.encoder.layer)), cond, cond_atts)
        gathered = torch.gather(hidden, 1, masked_pos[:, :, None].expand(-1, -1, hidden.shape[-1]))
        return self.cls.predictions(gathered)
