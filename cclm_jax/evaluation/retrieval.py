"""Retrieval evaluation as the reference does it (spec §5.2), in jitted, sharded blocks.

Image <-> text (`RetrievalEvaluator.image_text_scores`):
1. Every image goes through the vision tower and every text through the text encoder in batches of
   `batch_size` rows; the last batch is padded (repeating its last row), so every batch, and every host,
   has the same shape; padded rows are dropped afterwards.
2. ITC similarities `sims = image_feat @ text_feat^T` (no temperature), (N_img, N_txt).
3. `rerank=True`: the top-`k_test` texts of every image and the top-`k_test` images of every text are scored
   by the fusion encoder's ITM "match" logit, `itm_logits(fuse(image, text)[:, 0])[:, 1]`; every other entry
   is -100. The (image, text) pairs of both directions are scored together in blocks of `pairs_per_block`
   pairs, each pair's image tokens and text states gathered on device (the block is padded, and split over
   the mesh's batch axes). `rerank=False` (dual encoder): the scores are the similarities.
4. `metrics.retrieval_metrics`: R@1/5/10 both ways, in percent, and their means.

Text <-> text (`RetrievalEvaluator.text_text_scores`, parallel sentences a_i <-> b_i): the same with
`text_features` on both sides; re-ranking fuses sentence b (the query stream) with sentence a's text-encoder
states as the condition, as the TTM head is trained. `parallel_text_metrics`: keys `a2b_*` (a -> b) and `b2a_*`.

`RetrievalEvaluator` keeps the jitted blocks of one model and mesh; reuse it (e.g. in a training loop) to
compile each block once. With a mesh, each process passes the full input arrays; inputs are laid out over the
mesh's batch axes (data x fsdp); parameters keep their shardings (unplaced ones are replicated).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from cclm_jax import parallel
from cclm_jax.data.normalize import normalize
from cclm_jax.evaluation import metrics
from cclm_jax.models.cclm import CCLM

NOT_RERANKED = -100.0  # the reference's score of every candidate outside the top k


@dataclasses.dataclass(frozen=True)
class RetrievalScores:
    """Score matrices of one evaluation (host float32).

    sims: (N_query, N_cand) ITC similarities (queries = images, or sentences a); score_i2t: (N_query, N_cand)
    and score_t2i: (N_cand, N_query), the matrices `metrics.retrieval_metrics` ranks.
    """

    sims: np.ndarray
    score_i2t: np.ndarray
    score_t2i: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Encoded:
    """One side, on device: embeds (N_pad, L, D), atts (N_pad, L), feats (N_pad, E); first `count` rows real."""

    embeds: jax.Array
    atts: jax.Array
    feats: jax.Array
    count: int


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """Repeat the last row until `x` has `rows` rows."""
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class RetrievalEvaluator:
    """Jitted encoding, candidate and re-ranking blocks for one CCLM `model` and mesh.

    batch_size: rows per encoding block; pairs_per_block: (cond, text) pairs per re-ranking block (default
    `4 * batch_size`). With a mesh both must be multiples of the batch shards (data x fsdp).
    """

    def __init__(self, model: CCLM, *, batch_size: int, mesh: Mesh | None = None,
                 pairs_per_block: int | None = None):
        self.model, self.mesh = model, mesh
        self.batch_size = int(batch_size)
        self.pairs_per_block = int(pairs_per_block or 4 * self.batch_size)
        shards = 1 if mesh is None else parallel.num_batch_shards(mesh)
        for name, value in (("batch_size", self.batch_size), ("pairs_per_block", self.pairs_per_block)):
            if value <= 0 or value % shards:
                raise ValueError(f"retrieval evaluation: {name}={value} must be a positive multiple of the "
                                 f"mesh's {shards} batch shards (data x fsdp)")
        self._rows = None if mesh is None else parallel.batch_sharding(mesh)
        replicated = {} if mesh is None else {"out_shardings": parallel.replicated(mesh)}
        self._image_block = jax.jit(self._encode_images)
        self._text_block = jax.jit(self._encode_texts)
        self._candidates = jax.jit(self._top_candidates, static_argnums=(2, 3, 4, 5), **replicated)
        self._pair_block = jax.jit(self._match_logits, **replicated)

    # ------------------------------------------------------------------------------------------ device code

    def _apply(self, params, method: str, *args):
        return self.model.apply({"params": params}, *args, method=getattr(self.model, method))

    def _encode_images(self, params, images):
        if images.dtype == jnp.uint8:
            images = normalize(images)
        embeds, atts = self._apply(params, "encode_image", images)
        return embeds, atts, self._apply(params, "image_features", embeds)

    def _encode_texts(self, params, ids, atts):
        embeds = self._apply(params, "encode_text", ids, atts)
        return embeds, atts, self._apply(params, "text_features", embeds)

    @staticmethod
    def _top_candidates(cond_feats, text_feats, n_cond: int, n_text: int, k_i2t: int, k_t2i: int):
        """sims (n_cond, n_text), the top-k_i2t columns of each row and the top-k_t2i rows of each column."""
        sims = jnp.matmul(cond_feats[:n_cond], text_feats[:n_text].T, precision=jax.lax.Precision.HIGHEST)
        return sims, jax.lax.top_k(sims, k_i2t)[1], jax.lax.top_k(sims.T, k_t2i)[1]

    def _match_logits(self, params, cond_embeds, cond_atts, text_embeds, text_atts, cond_idx, text_idx):
        """(P,) ITM "match" logits of the pairs (cond_idx[p], text_idx[p])."""
        cross = self._apply(params, "fuse", cond_embeds[cond_idx], cond_atts[cond_idx], text_embeds[text_idx],
                            text_atts[text_idx])
        return self._apply(params, "itm_logits", cross[:, 0])[:, 1]

    # ------------------------------------------------------------------------------------------ host side

    def _put(self, x: np.ndarray) -> jax.Array:
        x = np.asarray(x)
        if self._rows is None:
            return jnp.asarray(x)
        return jax.make_array_from_callback(x.shape, self._rows, lambda index: x[index])

    def _place_params(self, params):
        if self.mesh is None:
            return params
        devices = set(self.mesh.devices.flat)
        replicated = parallel.replicated(self.mesh)

        def place(x):
            if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.device_set == devices:
                return x
            return jax.device_put(x, replicated)

        return jax.tree.map(place, params)

    def _encode(self, block, params, *arrays: np.ndarray) -> _Encoded:
        count = arrays[0].shape[0]
        if count == 0:
            raise ValueError("retrieval evaluation needs at least one image/text on each side")
        rows = _round_up(count, self.batch_size)
        arrays = [_pad_rows(np.asarray(a), rows) for a in arrays]
        outs = [block(params, *(self._put(a[s:s + self.batch_size]) for a in arrays))
                for s in range(0, rows, self.batch_size)]
        embeds, atts, feats = (jnp.concatenate(parts) for parts in zip(*outs))
        return _Encoded(embeds, atts, feats, count)

    def _score(self, params, cond: _Encoded, text: _Encoded, k_test: int, rerank: bool) -> RetrievalScores:
        if isinstance(k_test, bool) or not isinstance(k_test, (int, np.integer)) or k_test < 1:
            raise ValueError(f"k_test must be a positive int, got {k_test!r}")
        n_cond, n_text = cond.count, text.count
        k_i2t, k_t2i = min(int(k_test), n_text), min(int(k_test), n_cond)
        sims, i2t, t2i = (np.asarray(x) for x in self._candidates(cond.feats, text.feats, n_cond, n_text,
                                                                   k_i2t, k_t2i))
        sims = sims.astype(np.float32)
        if not rerank:
            return RetrievalScores(sims, sims, np.ascontiguousarray(sims.T))
        cond_idx = np.concatenate([np.repeat(np.arange(n_cond), k_i2t), t2i.reshape(-1)])
        text_idx = np.concatenate([i2t.reshape(-1), np.repeat(np.arange(n_text), k_t2i)])
        scores = self._match_pairs(params, cond, text, cond_idx, text_idx)
        score_i2t = metrics.scatter_topk_scores(i2t, scores[: n_cond * k_i2t].reshape(n_cond, k_i2t),
                                                (n_cond, n_text), NOT_RERANKED)
        score_t2i = metrics.scatter_topk_scores(t2i, scores[n_cond * k_i2t:].reshape(n_text, k_t2i),
                                                (n_text, n_cond), NOT_RERANKED)
        return RetrievalScores(sims, score_i2t, score_t2i)

    def _match_pairs(self, params, cond: _Encoded, text: _Encoded, cond_idx: np.ndarray,
                     text_idx: np.ndarray) -> np.ndarray:
        """ITM match logits of all pairs, in padded blocks; (P,) float32 on the host."""
        total = cond_idx.shape[0]
        block = self.pairs_per_block
        padded = _round_up(total, block)
        cond_idx = np.pad(cond_idx, (0, padded - total)).astype(np.int32)
        text_idx = np.pad(text_idx, (0, padded - total)).astype(np.int32)
        outs = [self._pair_block(params, cond.embeds, cond.atts, text.embeds, text.atts,
                                 self._put(cond_idx[s:s + block]), self._put(text_idx[s:s + block]))
                for s in range(0, padded, block)]
        return np.concatenate([np.asarray(o) for o in outs])[:total].astype(np.float32)

    # ------------------------------------------------------------------------------------------ public

    def image_text_scores(self, params, images, text_ids, text_atts, *, k_test: int,
                          rerank: bool = True) -> RetrievalScores:
        """Score matrices for images (N_img, H, W, 3) (uint8 NHWC, normalised on device, or float normalised)
        against texts `text_ids`, `text_atts` (N_txt, L) int."""
        params = self._place_params(params)
        images = np.asarray(images)
        if images.ndim != 4:
            raise ValueError(f"images must be (N, H, W, 3) uint8 or normalised float, got shape {images.shape}")
        _check_texts("text", text_ids, text_atts)
        image_side = self._encode(self._image_block, params, images)
        text_side = self._encode(self._text_block, params, text_ids, text_atts)
        return self._score(params, image_side, text_side, k_test, rerank)

    def text_text_scores(self, params, ids_a, atts_a, ids_b, atts_b, *, k_test: int,
                         rerank: bool = True) -> RetrievalScores:
        """Score matrices for sentences a (queries, and the condition when re-ranking) against sentences b."""
        params = self._place_params(params)
        _check_texts("a", ids_a, atts_a)
        _check_texts("b", ids_b, atts_b)
        side_a = self._encode(self._text_block, params, ids_a, atts_a)
        side_b = self._encode(self._text_block, params, ids_b, atts_b)
        return self._score(params, side_a, side_b, k_test, rerank)


def _check_texts(name: str, ids, atts) -> None:
    ids, atts = np.shape(ids), np.shape(atts)
    if len(ids) != 2 or ids != atts:
        raise ValueError(f"{name} ids {ids} and atts {atts} must both be (N, L)")


def parallel_text_metrics(scores: RetrievalScores) -> dict[str, float]:
    """Recalls of aligned sentence pairs (a_i <-> b_i) from their score matrices, keys `a2b_*`, `b2a_*`, `r_mean`."""
    n = scores.score_i2t.shape[0]
    if scores.score_i2t.shape != (n, n):
        raise ValueError(f"parallel sentences need a square score matrix, got {scores.score_i2t.shape}")
    out = metrics.retrieval_metrics(scores.score_i2t, scores.score_t2i, np.arange(n), [[i] for i in range(n)])
    renamed = {"txt": "a2b", "img": "b2a"}
    return {(renamed[k[:3]] + k[3:] if k[:3] in renamed else k): v for k, v in out.items()}

