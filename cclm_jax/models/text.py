"""XLM-R/BERT post-LN text stack with fusion layers (the CCLM text tower), Flax Linen.

Layers `0 .. fusion_layer-1` are the text encoder; layers `fusion_layer .. num_layers-1` add a
cross-attention block (query from the text stream, key/value from a condition: image tokens, or the other
sentence's text-encoder states) between self-attention and the FFN (spec §1.3). Position ids start at 0,
token-type row 0 is always added, self-attention masks are (1-m)*-10000 and cross-attention masks (1-m)*-1e9.

Shapes: ids/atts (B, L) int; hidden states (B, L, D); condition (B, Lc, Dc) with Dc the encoder width.
Parameter names mirror the PyTorch `bert.*` keys (`encoder.layer.{i}` <-> `layer_{i}`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cclm_jax.models.common import DenseGeneral, LayerNorm, attention_softmax, fused_attention, param_with_axes

SELF_MASK_VALUE = -10000.0
CROSS_MASK_VALUE = -1e9


def self_attention_bias(atts: jax.Array) -> jax.Array:
    """(B, L) {0,1} mask -> (B, 1, 1, L) float32 additive bias, (1-m) * -10000."""
    return ((1.0 - atts.astype(jnp.float32)) * SELF_MASK_VALUE)[:, None, None, :]


def cross_attention_bias(atts: jax.Array) -> jax.Array:
    """(B, Lc) {0,1} mask -> (B, 1, 1, Lc) float32 additive bias, (1-m) * -1e9."""
    return ((1.0 - atts.astype(jnp.float32)) * CROSS_MASK_VALUE)[:, None, None, :]


def bert_init(std: float = 0.02):
    """BERT's N(0, std) weight initialisation."""
    return nn.initializers.normal(stddev=std)


class AttentionCore(nn.Module):
    """Query/key/value projections and scaled dot-product attention (torch `*.self`).

    x (B, L, D) queries; kv: the key/value source (B, Lk, Dk), or its projections `(keys, values)` each
    (B, Lk, nH, hd) from `key_value` (computed once, reused by several passes); bias (B, 1, 1, Lk) additive
    float32. Returns the context (B, L, nH, hd). `attention_impl` 'dot_product' routes through
    `fused_attention` when attention dropout is inactive; otherwise the explicit einsums run.
    """

    num_heads: int
    head_dim: int
    attention_dropout: float
    deterministic: bool = True
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    def setup(self):
        def proj():
            return DenseGeneral((self.num_heads, self.head_dim), axes=("embed", "heads", None),
                                dtype=self.dtype, kernel_init=bert_init())

        self.query, self.key, self.value = proj(), proj(), proj()
        self.dropout = nn.Dropout(self.attention_dropout)

    def key_value(self, kv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, Lk, Dk) -> (keys, values), each (B, Lk, nH, hd) in the compute dtype."""
        return self.key(kv), self.value(kv)

    def __call__(self, x: jax.Array, kv: jax.Array | tuple[jax.Array, jax.Array], bias: jax.Array) -> jax.Array:
        q = self.query(x) * (self.head_dim ** -0.5)
        k, v = kv if isinstance(kv, tuple) else self.key_value(kv)
        if self.attention_impl == "dot_product" and (self.deterministic or self.attention_dropout == 0.0):
            return fused_attention(q, k.astype(q.dtype), v.astype(q.dtype), bias)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        probs = attention_softmax(scores)
        probs = self.dropout(probs, deterministic=self.deterministic)
        return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)


class ResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual) (torch `*.output`); `axis` = the contracted input dims."""

    hidden: int
    axes: tuple
    axis: tuple
    dropout: float
    eps: float
    deterministic: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        y = DenseGeneral(self.hidden, axis=self.axis, axes=self.axes, dtype=self.dtype,
                         kernel_init=bert_init(), name="dense")(x)
        y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
        return LayerNorm(self.eps, name="LayerNorm")(y + residual).astype(self.dtype)


class Attention(nn.Module):
    """BERT attention block, self or cross: LN(x + dropout(dense(attention(x, kv)))); (B, L, D).

    `kv` as in `AttentionCore` (a source array or precomputed `(keys, values)`).
    """

    hidden: int
    num_heads: int
    dropout: float
    attention_dropout: float
    eps: float
    deterministic: bool = True
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    def setup(self):
        self.self = AttentionCore(self.num_heads, self.hidden // self.num_heads, self.attention_dropout,
                                  self.deterministic, self.dtype, self.attention_impl)
        self.output = ResidualOutput(self.hidden, ("heads", None, "embed"), (-2, -1), self.dropout, self.eps,
                                     self.deterministic, self.dtype)

    def key_value(self, kv: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.self.key_value(kv)

    def __call__(self, x: jax.Array, kv: jax.Array | tuple[jax.Array, jax.Array], bias: jax.Array) -> jax.Array:
        return self.output(self.self(x, kv, bias), x)


class Intermediate(nn.Module):
    """FFN up-projection with exact GELU (torch `intermediate`); (B, L, D) -> (B, L, F)."""

    intermediate: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = DenseGeneral(self.intermediate, axes=("embed", "mlp"), dtype=self.dtype,
                         kernel_init=bert_init(), name="dense")(x)
        return nn.gelu(h, approximate=False)


class TextLayer(nn.Module):
    """One post-LN BERT layer; with `cross=True` a cross-attention block sits before the FFN.

    `cond` is the cross-attention source (B, Lc, Dc) or its precomputed `(keys, values)` (`cross_key_value`).
    """

    hidden: int
    num_heads: int
    intermediate_size: int
    cross: bool
    dropout: float
    attention_dropout: float
    eps: float
    deterministic: bool = True
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    def setup(self):
        def attention():
            return Attention(self.hidden, self.num_heads, self.dropout, self.attention_dropout, self.eps,
                             self.deterministic, self.dtype, self.attention_impl)

        self.attention = attention()
        if self.cross:
            self.crossattention = attention()
        self.intermediate = Intermediate(self.intermediate_size, self.dtype)
        self.output = ResidualOutput(self.hidden, ("mlp", "embed"), (-1,), self.dropout, self.eps,
                                     self.deterministic, self.dtype)

    def cross_key_value(self, cond: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The cross-attention (keys, values) of a condition (B, Lc, Dc), each (B, Lc, nH, hd)."""
        return self.crossattention.key_value(cond)

    def __call__(self, x: jax.Array, bias: jax.Array, cond: jax.Array | tuple | None = None,
                 cond_bias: jax.Array | None = None) -> jax.Array:
        x = self.attention(x, x, bias)
        if self.cross and cond is not None:  # without a condition a fusion layer skips cross-attention
            x = self.crossattention(x, cond, cond_bias)
        return self.output(self.intermediate(x), x)


def roberta_position_ids(ids: jax.Array, pad_token_id: int) -> jax.Array:
    """RoBERTa / XLM-R position ids (HF `create_position_ids_from_input_ids`): real tokens count up from
    pad_token_id + 1 (2, 3, ... for XLM-R), pads keep pad_token_id; (B, L) -> (B, L) int32."""
    real = (ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + pad_token_id


class Embeddings(nn.Module):
    """word[ids] + position + token_type[0] -> LayerNorm -> dropout; (B, L) -> (B, L, D).

    Positions are 0..L-1 (BERT, CCLM) or, with `roberta_pad_id` set, `roberta_position_ids(ids, roberta_pad_id)`
    (XLM-R, X2-VLM's text encoder).
    """

    vocab_size: int
    hidden: int
    max_positions: int
    type_vocab_size: int
    dropout: float
    eps: float
    deterministic: bool = True
    dtype: Any = jnp.float32
    roberta_pad_id: int | None = None

    def setup(self):
        self.word_embeddings = param_with_axes(
            self, "word_embeddings", bert_init(), (self.vocab_size, self.hidden), ("vocab", "embed"))
        self.position_embeddings = param_with_axes(
            self, "position_embeddings", bert_init(), (self.max_positions, self.hidden), (None, "embed"))
        self.token_type_embeddings = param_with_axes(
            self, "token_type_embeddings", bert_init(), (self.type_vocab_size, self.hidden), (None, "embed"))
        self.LayerNorm = LayerNorm(self.eps)
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = jnp.take(self.word_embeddings, ids, axis=0)
        if self.roberta_pad_id is None:
            positions = self.position_embeddings[:ids.shape[1]][None]
        else:
            positions = jnp.take(self.position_embeddings, roberta_position_ids(ids, self.roberta_pad_id), axis=0)
        x = x + positions + self.token_type_embeddings[0][None, None]
        x = self.LayerNorm(x)
        return self.drop(x, deterministic=self.deterministic).astype(self.dtype)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Tied decoder: (..., D) -> (..., vocab) logits against the word embedding matrix."""
        return jnp.einsum("...d,vd->...v", hidden, self.word_embeddings.astype(hidden.dtype))


class TextStack(nn.Module):
    """Embeddings + `num_layers` post-LN layers, the last `num_layers - fusion_layer` with cross-attention.

    With `scan_layers` each run of layers (text, fusion) is one `lax.scan` over the layers' parameters stacked on
    the fly: the parameter tree keeps its per-layer `layer_{i}` entries (checkpoints, interop, optimizer groups
    and shardings are unchanged) while the compiled program holds one copy of the layer instead of one per
    layer and pass. Initialisation always runs the plain loop.

    X2-VLM uses two stacks: a text encoder (`fusion_layer = num_layers`, `roberta_pad_id` set: XLM-R positions)
    and a cross encoder without embeddings (`vocab_size = 0`, `fusion_layer = 0`: `fuse` runs every layer).
    """

    vocab_size: int
    hidden: int
    num_heads: int
    intermediate: int
    num_layers: int
    fusion_layer: int
    max_positions: int
    type_vocab_size: int
    dropout: float
    attention_dropout: float
    eps: float
    remat: bool = False
    deterministic: bool = True
    dtype: Any = jnp.float32
    attention_impl: str = "xla"
    scan_layers: bool = False
    roberta_pad_id: int | None = None

    def setup(self):
        if self.vocab_size:
            self.embeddings = Embeddings(self.vocab_size, self.hidden, self.max_positions,
                                         self.type_vocab_size, self.dropout, self.eps, self.deterministic,
                                         self.dtype, self.roberta_pad_id)
        layer_cls = nn.remat(TextLayer) if self.remat else TextLayer
        self.layer = [
            layer_cls(self.hidden, self.num_heads, self.intermediate, i >= self.fusion_layer,
                      self.dropout, self.attention_dropout, self.eps, self.deterministic, self.dtype,
                      self.attention_impl)
            for i in range(self.num_layers)
        ]

    def encode(self, ids: jax.Array, atts: jax.Array) -> jax.Array:
        """Text encoder ('text' mode): embeddings + layers [0, fusion_layer); (B, L) -> (B, L, D)."""
        return self._layers(range(self.fusion_layer), self.embeddings(ids), self_attention_bias(atts))

    def cross_key_values(self, cond: jax.Array) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """Every fusion layer's cross-attention (keys, values) of a condition (B, Lc, Dc), each (B, Lc, nH, hd)."""
        cond = cond.astype(self.dtype)
        return tuple(layer.cross_key_value(cond) for layer in self.layer[self.fusion_layer:])

    def fuse(self, x: jax.Array, atts: jax.Array, cond: jax.Array | tuple, cond_atts: jax.Array) -> jax.Array:
        """Fusion encoder ('fusion' mode): layers [fusion_layer, num_layers) cross-attending to `cond`.

        `cond`: the condition (B, Lc, Dc), or its per-layer (keys, values) from `cross_key_values`.
        """
        n_fusion = self.num_layers - self.fusion_layer
        if isinstance(cond, tuple) and len(cond) != n_fusion:
            raise ValueError(f"cached cross keys/values for {len(cond)} layers, the model has {n_fusion} "
                             "fusion layers")
        if not isinstance(cond, tuple):
            cond = cond.astype(self.dtype)
        return self._layers(range(self.fusion_layer, self.num_layers), x, self_attention_bias(atts), cond,
                            cross_attention_bias(cond_atts))

    def encode_all(self, ids: jax.Array, atts: jax.Array) -> jax.Array:
        """All layers without a condition (fusion layers skip cross-attention), as for TLM."""
        x = self.embeddings(ids)
        bias = self_attention_bias(atts)
        x = self._layers(range(self.fusion_layer), x, bias)
        return self._layers(range(self.fusion_layer, self.num_layers), x, bias)

    def _layers(self, indices: range, x: jax.Array, bias: jax.Array, cond: jax.Array | tuple | None = None,
                cond_bias: jax.Array | None = None) -> jax.Array:
        """Layers `indices` in order (all text or all fusion layers); `cond` one array or per-layer (k, v) pairs."""
        per_layer = isinstance(cond, tuple)
        if not self.scan_layers or self.is_initializing() or len(indices) < 2:
            for n, i in enumerate(indices):
                x = self.layer[i](x, bias, cond[n] if per_layer else cond, cond_bias)
            return x
        stack = lambda trees: jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)  # noqa: E731
        params = stack([self.layer[i].variables["params"] for i in indices])
        layer = TextLayer(self.hidden, self.num_heads, self.intermediate, indices[0] >= self.fusion_layer,
                          self.dropout, self.attention_dropout, self.eps, self.deterministic, self.dtype,
                          self.attention_impl, parent=None)
        keys = None if self.deterministic else jax.random.split(self.make_rng("dropout"), len(indices))

        def body(h, xs):
            p, layer_cond, key = xs
            rngs = None if key is None else {"dropout": key}
            return layer.apply({"params": p}, h, bias, layer_cond if per_layer else cond, cond_bias, rngs=rngs), None

        if self.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, (params, stack(cond) if per_layer else None, keys))
        return x

    def attend(self, hidden: jax.Array) -> jax.Array:
        return self.embeddings.attend(hidden)
