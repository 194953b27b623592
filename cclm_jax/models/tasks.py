"""Fine-tuning task models (spec §5.3-5.5) and their initialisation from a pre-trained CCLM tree.

Every task model reuses the CCLM parameter names (`vision_encoder`, `text_encoder/{embeddings, layer_i}`), so
the pre-trained subtrees drop in unchanged; only the task parts are new:

- `XVNLIModel`: image + hypothesis through all text layers, `cls_head` = MLP(D -> 2D -> 3) on the fused CLS.
  Labels: contradiction 0, entailment 1, neutral 2.
- `NLVRModel` (MaRVL / NLVR2): the text stack becomes F text layers + 2(N-F) fusion layers; pre-trained fusion
  layer l (F <= l < N) is copied to positions F+2(l-F) (even copy, cross-attends to image 0) and F+2(l-F)+1
  (odd copy, image 1). Each pair of copies shares ONE cross-attention key/value parameter: the stored tree
  holds it in the even copy only (`text_encoder/layer_{odd}/crossattention/self` has no `key`/`value`);
  `NLVRModel.apply` lends the even copy's key/value to the odd copy, so gradients from both copies add up in
  the one parameter. `cls_head` = MLP(D -> 2D -> 2) (label 1 = the statement is true).
- `VQAModel` (xGQA): question encoded by all N layers cross-attending to the image; `text_decoder` = its own
  embeddings + N-F causal layers, each with cross-attention to the question states, initialised from the
  encoder's embeddings and fusion layers F..N-1; `lm_head` = the pre-trained MLM head (transform + bias), its
  decoder matrix tied to `text_decoder`'s word embeddings. Answers are ranked generatively (`rank_answers`).

Shapes: images (B, H, W, 3) float, normalised (see `cclm.CCLM.encode_image`); ids/atts (B, L) int;
hidden states (B, L, D); logits float32.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from cclm_jax.models.cclm import DTYPES, to_nhwc
from cclm_jax.models.heads import MLMHead, MLPHead
from cclm_jax.models.swin import SwinTransformer
from cclm_jax.models.text import Embeddings, TextLayer, TextStack, cross_attention_bias, self_attention_bias

XVNLI_CLASSES = 3
NLVR_CLASSES = 2
BOS_ID = 0  # `<s>`: the decoder's start token
CAUSAL_MASK_VALUE = -10000.0  # the reference's decoder self-attention mask, as for the encoder


# ----------------------------------------------------------------------------------------------------------
# Towers built from a `model` config (the same arguments `CCLM.setup` uses)
# ----------------------------------------------------------------------------------------------------------

def vision_tower(cfg: ml_collections.ConfigDict, deterministic: bool) -> SwinTransformer:
    v = cfg.vision
    return SwinTransformer(
        image_res=v.image_res, patch_size=v.patch_size, embed_dim=v.embed_dim, depths=tuple(v.depths),
        num_heads=tuple(v.num_heads), window_size=v.window_size, mlp_ratio=v.mlp_ratio,
        drop_path_rate=v.drop_path_rate, remat=cfg.remat, deterministic=deterministic, dtype=DTYPES[cfg.dtype])


def text_tower_args(cfg: ml_collections.ConfigDict, deterministic: bool) -> dict[str, Any]:
    """Keyword arguments of `TextStack` (and of the answer decoder) from a `model` config. The NLVR fusion
    copies and the decoder run their layers in a Python loop whatever `scan_layers` says."""
    t = cfg.text
    return dict(vocab_size=t.vocab_size, hidden=t.hidden_size, num_heads=t.num_heads,
                intermediate=t.intermediate_size, num_layers=t.num_layers, fusion_layer=t.fusion_layer,
                max_positions=t.max_position_embeddings, type_vocab_size=t.type_vocab_size,
                dropout=t.hidden_dropout, attention_dropout=t.attention_dropout, eps=t.layer_norm_eps,
                remat=cfg.remat, deterministic=deterministic, dtype=DTYPES[cfg.dtype],
                attention_impl=cfg.get("attention_impl", "xla"), scan_layers=cfg.get("scan_layers", False))


class _ImageTextEncoder(nn.Module):
    """Shared part of the task models: `config` is the CCLM `model` config (validate it with
    `validate_model_config`); subclasses define `vision_encoder` in `setup`."""

    config: ml_collections.ConfigDict
    deterministic: bool = True

    def encode_image(self, image: jax.Array) -> tuple[jax.Array, jax.Array]:
        embeds = self.vision_encoder(to_nhwc(image))
        return embeds, jnp.ones(embeds.shape[:2], jnp.int32)


# ----------------------------------------------------------------------------------------------------------
# XVNLI
# ----------------------------------------------------------------------------------------------------------

class XVNLIModel(_ImageTextEncoder):
    """3-way entailment classifier: `__call__(image, ids, atts) -> logits (B, 3)`."""

    def setup(self):
        self.vision_encoder = vision_tower(self.config, self.deterministic)
        self.text_encoder = TextStack(**text_tower_args(self.config, self.deterministic))
        self.cls_head = MLPHead(XVNLI_CLASSES, DTYPES[self.config.dtype])

    def __call__(self, image: jax.Array, ids: jax.Array, atts: jax.Array) -> jax.Array:
        image_embeds, image_atts = self.encode_image(image)
        text = self.text_encoder.encode(ids, atts)
        cross = self.text_encoder.fuse(text, atts, image_embeds, image_atts)
        return self.cls_head(cross[:, 0])


# ----------------------------------------------------------------------------------------------------------
# NLVR2 / MaRVL
# ----------------------------------------------------------------------------------------------------------

def nlvr_num_layers(num_layers: int, fusion_layer: int) -> int:
    """Layers of the two-image text stack: the text layers plus every fusion layer twice."""
    return fusion_layer + 2 * (num_layers - fusion_layer)


class TwoImageTextStack(TextStack):
    """A TextStack whose fusion layers alternate between two conditions (even copies: 0, odd copies: 1)."""

    def fuse_two(self, x: jax.Array, atts: jax.Array, conds: tuple[jax.Array, jax.Array],
                 cond_atts: tuple[jax.Array, jax.Array]) -> jax.Array:
        bias = self_attention_bias(atts)
        cond_biases = [cross_attention_bias(a) for a in cond_atts]
        conds = [c.astype(self.dtype) for c in conds]
        for i, layer in enumerate(self.layer[self.fusion_layer:]):
            x = layer(x, bias, conds[i % 2], cond_biases[i % 2])
        return x


class NLVRModel(_ImageTextEncoder):
    """Two-image classifier: `__call__(image, image_2, ids, atts) -> logits (B, 2)`.

    `config` is the pre-trained CCLM `model` config (N layers, fusion layer F); the stack built here has
    `nlvr_num_layers(N, F)` layers. `apply`/`init` work on the stored tree (key/value shared within a pair).
    """

    def setup(self):
        t = self.config.text
        args = text_tower_args(self.config, self.deterministic)
        args["num_layers"] = nlvr_num_layers(t.num_layers, t.fusion_layer)
        self.vision_encoder = vision_tower(self.config, self.deterministic)
        self.text_encoder = TwoImageTextStack(**args)
        self.cls_head = MLPHead(NLVR_CLASSES, DTYPES[self.config.dtype])

    def __call__(self, image: jax.Array, image_2: jax.Array, ids: jax.Array, atts: jax.Array) -> jax.Array:
        b = image.shape[0]
        embeds, embeds_atts = self.encode_image(jnp.concatenate([image, image_2]))
        text = self.text_encoder.encode(ids, atts)
        cross = self.text_encoder.fuse_two(text, atts, (embeds[:b], embeds[b:]), (embeds_atts[:b], embeds_atts[b:]))
        return self.cls_head(cross[:, 0])

    def apply(self, variables, *args, **kwargs):
        """`nn.Module.apply` on the stored tree: odd fusion copies borrow their pair's key/value first."""
        params = lend_shared_cross_kv(variables["params"], self.config.text.fusion_layer)
        return super().apply({**variables, "params": params}, *args, **kwargs)

    def init(self, *args, **kwargs):
        """`nn.Module.init`, returning the stored tree (one key/value per pair of fusion copies)."""
        variables = super().init(*args, **kwargs)
        params = drop_shared_cross_kv(variables["params"], self.config.text.fusion_layer)
        return {**variables, "params": params}


SHARED_KV = ("key", "value")


def _odd_copies(text_params: dict, fusion_layer: int) -> list[int]:
    n = sum(1 for name in text_params if name.startswith("layer_"))
    return list(range(fusion_layer + 1, n, 2))


def drop_shared_cross_kv(params: dict, fusion_layer: int) -> dict:
    """Full NLVR tree -> stored tree: the odd copies' cross-attention key/value removed."""
    text = dict(params["text_encoder"])
    for i in _odd_copies(text, fusion_layer):
        layer = dict(text[f"layer_{i}"])
        cross = dict(layer["crossattention"])
        cross["self"] = {k: v for k, v in cross["self"].items() if k not in SHARED_KV}
        layer["crossattention"] = cross
        text[f"layer_{i}"] = layer
    return {**params, "text_encoder": text}


def lend_shared_cross_kv(params: dict, fusion_layer: int) -> dict:
    """Stored NLVR tree -> full tree: layer F+2j+1's cross key/value are layer F+2j's (the same arrays)."""
    text = dict(params["text_encoder"])
    for i in _odd_copies(text, fusion_layer):
        layer = dict(text[f"layer_{i}"])
        cross = dict(layer["crossattention"])
        even = text[f"layer_{i - 1}"]["crossattention"]["self"]
        present = [k for k in SHARED_KV if k in cross["self"]]
        if present:
            raise ValueError(f"text_encoder/layer_{i}/crossattention/self holds its own {present}: the NLVR tree "
                             f"stores the shared cross-attention key/value only in layer_{i - 1}")
        cross["self"] = {**cross["self"], **{k: even[k] for k in SHARED_KV}}
        layer["crossattention"] = cross
        text[f"layer_{i}"] = layer
    return {**params, "text_encoder": text}


# ----------------------------------------------------------------------------------------------------------
# xGQA: generative answer ranking
# ----------------------------------------------------------------------------------------------------------

def causal_attention_bias(atts: jax.Array) -> jax.Array:
    """(B, L) {0,1} -> (B, 1, L, L) float32: position i sees real positions j <= i; else -10000."""
    length = atts.shape[1]
    causal = jnp.tril(jnp.ones((length, length), jnp.float32))
    allowed = causal[None, None] * atts.astype(jnp.float32)[:, None, None, :]
    return (1.0 - allowed) * CAUSAL_MASK_VALUE


class AnswerDecoder(nn.Module):
    """Causal text decoder: embeddings + `num_layers` layers, each cross-attending to a condition.

    `__call__(ids, atts, cond, cond_atts) -> (B, L, D)`; `attend(hidden) -> (..., V)` is the tied output matrix.
    """

    vocab_size: int
    hidden: int
    num_heads: int
    intermediate: int
    num_layers: int
    max_positions: int
    type_vocab_size: int
    dropout: float
    attention_dropout: float
    eps: float
    remat: bool = False
    deterministic: bool = True
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    def setup(self):
        self.embeddings = Embeddings(self.vocab_size, self.hidden, self.max_positions, self.type_vocab_size,
                                     self.dropout, self.eps, self.deterministic, self.dtype)
        layer_cls = nn.remat(TextLayer) if self.remat else TextLayer
        self.layer = [layer_cls(self.hidden, self.num_heads, self.intermediate, True, self.dropout,
                                self.attention_dropout, self.eps, self.deterministic, self.dtype,
                                self.attention_impl)
                      for _ in range(self.num_layers)]

    def __call__(self, ids: jax.Array, atts: jax.Array, cond: jax.Array, cond_atts: jax.Array) -> jax.Array:
        x = self.embeddings(ids)
        bias = causal_attention_bias(atts)
        cond_bias = cross_attention_bias(cond_atts)
        cond = cond.astype(self.dtype)
        for layer in self.layer:
            x = layer(x, bias, cond, cond_bias)
        return x

    def attend(self, hidden: jax.Array) -> jax.Array:
        return self.embeddings.attend(hidden)


class VQAModel(_ImageTextEncoder):
    """Generative VQA (the reference's ALBEF-style ranking).

    - `question_states(image, ids, atts) -> (B, Lq, D)`: all N layers, cross-attending to the image.
    - `answer_nll(answer_ids, answer_atts, states, state_atts) -> (B',)`: summed next-token cross-entropy of
      `<s> answer </s>` rows (targets = ids[:, 1:] where atts[:, 1:] = 1), conditioned on question states
      (B', Lq, D).
    - `rank_answers(image, ids, atts, answer_ids (A, La), answer_atts (A, La), k) -> (ranked (B, k) int32,
      scores (B, k) float32)`: the k answers with the highest first-token probability, re-ranked by
      log p(first token) + the answer's full log-likelihood (the reference's score, which counts the first
      token twice), best first.
    """

    def setup(self):
        t = self.config.text
        args = text_tower_args(self.config, self.deterministic)
        self.vision_encoder = vision_tower(self.config, self.deterministic)
        self.text_encoder = TextStack(**args)
        del args["num_layers"], args["fusion_layer"], args["scan_layers"]  # the decoder runs its layers in a loop
        self.text_decoder = AnswerDecoder(num_layers=t.num_layers - t.fusion_layer, **args)
        self.lm_head = MLMHead(t.vocab_size, t.layer_norm_eps, DTYPES[self.config.dtype])

    def __call__(self, image, ids, atts, answer_ids, answer_atts):
        """Touches every parameter (for `init`): the NLL of one answer row per question, (B,)."""
        return self.answer_nll(answer_ids, answer_atts, self.question_states(image, ids, atts), atts)

    def question_states(self, image: jax.Array, ids: jax.Array, atts: jax.Array) -> jax.Array:
        image_embeds, image_atts = self.encode_image(image)
        return self.text_encoder.fuse(self.text_encoder.encode(ids, atts), atts, image_embeds, image_atts)

    def answer_logits(self, answer_ids, answer_atts, states, state_atts) -> jax.Array:
        """(B', La, V) float32 next-token logits of every answer position."""
        hidden = self.lm_head.transform(self.text_decoder(answer_ids, answer_atts, states, state_atts))
        return (self.text_decoder.attend(hidden) + self.lm_head.bias.astype(hidden.dtype)).astype(jnp.float32)

    def answer_nll(self, answer_ids, answer_atts, states, state_atts) -> jax.Array:
        logits = self.answer_logits(answer_ids, answer_atts, states, state_atts)[:, :-1]
        targets = answer_ids[:, 1:]
        token_nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return jnp.sum(token_nll * answer_atts[:, 1:].astype(jnp.float32), axis=1)

    def rank_answers(self, image, ids, atts, answer_ids, answer_atts, k: int):
        b = ids.shape[0]
        k = min(int(k), answer_ids.shape[0])
        states = self.question_states(image, ids, atts)
        start = jnp.full((b, 1), BOS_ID, jnp.int32)
        first_logits = self.answer_logits(start, jnp.ones_like(start), states, atts)[:, 0]
        first_logp = jax.nn.log_softmax(first_logits, axis=-1)[:, answer_ids[:, 1]]  # (B, A)
        top_logp, top_ids = jax.lax.top_k(first_logp, k)  # (B, k)
        cand_ids = answer_ids[top_ids].reshape(b * k, -1)
        cand_atts = answer_atts[top_ids].reshape(b * k, -1)
        nll = self.answer_nll(cand_ids, cand_atts, jnp.repeat(states, k, axis=0), jnp.repeat(atts, k, axis=0))
        scores = top_logp - nll.reshape(b, k)
        order = jnp.argsort(-scores, axis=1, stable=True)
        return (jnp.take_along_axis(top_ids, order, axis=1).astype(jnp.int32),
                jnp.take_along_axis(scores, order, axis=1))


# ----------------------------------------------------------------------------------------------------------
# Parameters from a pre-trained CCLM tree
# ----------------------------------------------------------------------------------------------------------

def _copy(tree):
    """An independent copy of a parameter subtree (host numpy arrays)."""
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _text_layers(text_params: dict) -> tuple[int, int]:
    """(num_layers, fusion_layer) of a CCLM text tree (fusion = first layer with cross-attention)."""
    layers = sorted(int(k.split("_")[1]) for k in text_params if k.startswith("layer_"))
    if layers != list(range(len(layers))):
        raise ValueError(f"text_encoder layers must be layer_0..layer_{len(layers) - 1}, got {layers}")
    fusion = [i for i in layers if "crossattention" in text_params[f"layer_{i}"]]
    if not fusion or fusion != list(range(fusion[0], len(layers))):
        raise ValueError(f"text_encoder: expected cross-attention in a final block of layers, found it in {fusion}")
    return len(layers), fusion[0]


def _hidden_size(pretrained: dict) -> int:
    return int(np.shape(pretrained["text_encoder"]["embeddings"]["word_embeddings"])[1])


def _new_head(classes: int, hidden: int, rng: jax.Array) -> dict:
    """A freshly initialised MLP head (PyTorch default Linear init), as host numpy arrays."""
    head = MLPHead(classes)
    init = jax.jit(lambda key: nn.meta.unbox(head.init(key, jnp.zeros((1, hidden), jnp.float32))["params"]))
    return _copy(init(rng))


def _check_pretrained(pretrained: dict, needs: tuple[str, ...]) -> None:
    missing = [k for k in needs if k not in pretrained]
    if missing:
        raise ValueError(f"pre-trained CCLM parameters lack {missing} (top-level keys: {sorted(pretrained)})")


def init_retrieval_params(pretrained: dict) -> dict:
    """The retrieval model (the CCLM module itself) keeps everything but the MLM and box heads (spec §5.1)."""
    needs = ("temp", "vision_encoder", "text_encoder", "text_proj", "vision_proj", "itm_head")
    _check_pretrained(pretrained, needs)
    return {k: _copy(pretrained[k]) for k in needs}


def init_xvnli_params(pretrained: dict, rng: jax.Array) -> dict:
    """XVNLI tree: pre-trained towers + a new `cls_head` (3 classes)."""
    _check_pretrained(pretrained, ("vision_encoder", "text_encoder"))
    return {"vision_encoder": _copy(pretrained["vision_encoder"]),
            "text_encoder": _copy(pretrained["text_encoder"]),
            "cls_head": _new_head(XVNLI_CLASSES, _hidden_size(pretrained), rng)}


def init_nlvr_params(pretrained: dict, rng: jax.Array) -> dict:
    """NLVR tree: text layers as pre-trained, fusion layer l copied to F+2(l-F) and F+2(l-F)+1 (the odd copy
    without its own cross key/value), a new `cls_head` (2 classes)."""
    _check_pretrained(pretrained, ("vision_encoder", "text_encoder"))
    source = pretrained["text_encoder"]
    n, fusion = _text_layers(source)
    text = {"embeddings": _copy(source["embeddings"])}
    for i in range(fusion):
        text[f"layer_{i}"] = _copy(source[f"layer_{i}"])
    for layer in range(fusion, n):
        for copy in (0, 1):
            text[f"layer_{fusion + 2 * (layer - fusion) + copy}"] = _copy(source[f"layer_{layer}"])
    params = {"vision_encoder": _copy(pretrained["vision_encoder"]), "text_encoder": text,
              "cls_head": _new_head(NLVR_CLASSES, _hidden_size(pretrained), rng)}
    return drop_shared_cross_kv(params, fusion)


def init_vqa_params(pretrained: dict) -> dict:
    """VQA tree: pre-trained towers; decoder = copies of the embeddings and fusion layers F..N-1 (-> 0..N-F-1);
    `lm_head` = a copy of the MLM head."""
    _check_pretrained(pretrained, ("vision_encoder", "text_encoder", "mlm_head"))
    source = pretrained["text_encoder"]
    n, fusion = _text_layers(source)
    decoder = {"embeddings": _copy(source["embeddings"])}
    for i in range(n - fusion):
        decoder[f"layer_{i}"] = _copy(source[f"layer_{fusion + i}"])
    return {"vision_encoder": _copy(pretrained["vision_encoder"]), "text_encoder": _copy(source),
            "text_decoder": decoder, "lm_head": _copy(pretrained["mlm_head"])}
