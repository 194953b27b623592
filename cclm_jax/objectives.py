"""CCLM pre-training objectives: contrastive (ITC/TTC), matching with hard negatives (ITM/TTM), conditional MLM,
and region grounding (box L1 + GIoU).

One function per view (spec §2):
- `image_text_losses(model, params, batch, rng, negatives=None, ...)` -> {itc, itm, mlm} (+ `ttc` with two
  captions per image): caption conditioned on the image.
- `parallel_text_losses(...)` -> {ttc, ttm, mlm} (or {ttc, tlm} in TLM mode): the fusion layers cross-attend
  to the other sentence's text-encoder states exactly where they would attend to image tokens.
- `region_losses(...)` -> {itc, itm, mlm, bbox, giou}: region grounding (the 4M setting, X-VLM); see its docstring.

Batch keys (as the golden fixture): `image` (B, H, W, 3) or (B, 3, H, W) float, normalised; `text_ids`,
`text_atts`, `text_ids_masked` (B, L) int; `masked_pos` (B, M) int; `masked_ids` (B, M) int with -100 padding;
the same keys with suffix `_2` for a second sentence/caption; optional `valid` (B,) bool (padded examples
are excluded from every loss) and `idx` (B,) int (examples sharing an id are positives of each other).

Contrastive losses run over the *global* batch (the arrays are global under `jit`); hard negatives are drawn
within each data shard (`jax.shard_map` over the batch axes, as the reference does per GPU) or over the global
batch. `negatives` injects the draw: (2B,) global indices, first the negative image (cond) for each text, then
the negative text for each image (the golden `*_negs_t2i_then_i2t` layout).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, PartitionSpec

from cclm_jax.models.cclm import CCLM
from cclm_jax.models.regions import pool_regions

BATCH_AXES = ("data", "fsdp")
NEG_EPS = 1e-5  # added to the sampling weights, as the reference
IGNORE = -100


def default_objectives_config() -> ml_collections.ConfigDict:
    """`config.objectives`: loss weights and variants.

    weights: per-term multipliers (default 1; `bbox`, `giou`: the box losses of region batches). The
      reference's effective contrastive weight is 1/world_size (its all-gather returns only the local
      gradient and DDP then averages); set `contrastive_scale='reference'` to reproduce that (ITC/TTC
      multiplied by 1/number of data shards).
    negatives: 'local' (per data shard, the reference) or 'global' (over the whole batch).
    sample_2_captions: image batches carry a second caption (`*_2` keys): ITC averaged over both, plus TTC.
    use_tlm: the parallel-text view uses TTC + TLM (concatenated pair through all layers) instead of TTM + MLM.
    mlm_chunk: masked positions per vocabulary-logits chunk (0 = all at once); bounds MLM logits memory.
    """
    return ml_collections.ConfigDict({
        "weights": {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "ttc": 1.0, "ttm": 1.0, "tlm": 1.0, "bbox": 1.0,
                    "giou": 1.0},
        "contrastive_scale": "one",
        "negatives": "local",
        "sample_2_captions": False,
        "use_tlm": False,
        "mlm_chunk": 0,
    })


def validate_objectives_config(cfg: ml_collections.ConfigDict) -> None:
    if cfg.negatives not in ("local", "global"):
        raise ValueError(f"config.objectives.negatives must be 'local' or 'global', got {cfg.negatives!r}")
    if cfg.contrastive_scale not in ("one", "reference"):
        raise ValueError("config.objectives.contrastive_scale must be 'one' or 'reference', "
                         f"got {cfg.contrastive_scale!r}")
    for name, w in cfg.weights.items():
        if not w >= 0:
            raise ValueError(f"config.objectives.weights.{name} must be >= 0, got {w}")
    if cfg.mlm_chunk < 0:
        raise ValueError(f"config.objectives.mlm_chunk must be >= 0, got {cfg.mlm_chunk}")


@dataclasses.dataclass(frozen=True)
class Context:
    """What a loss needs besides params and batch: the bound model call and the sharding context."""

    model: CCLM
    params: Any
    mesh: Mesh | None
    negatives_scope: str
    mlm_chunk: int

    def __call__(self, method: str, *args, rng: jax.Array | None = None):
        rngs = {"dropout": rng} if rng is not None else None
        return self.model.apply({"params": self.params}, *args, method=getattr(self.model, method), rngs=rngs)

    @property
    def batch_shards(self) -> int:
        if self.mesh is None or self.negatives_scope == "global":
            return 1
        return int(self.mesh.shape["data"] * self.mesh.shape["fsdp"])


# ----------------------------------------------------------------------------------------------------------
# Contrastive
# ----------------------------------------------------------------------------------------------------------

def contrastive_loss(feat_a: jax.Array, feat_b: jax.Array, temp: jax.Array, idx: jax.Array | None = None,
                     valid: jax.Array | None = None) -> jax.Array:
    """Symmetric InfoNCE over the global batch; (N, E) x (N, E) -> scalar.

    logits = a b^T / temp; targets the diagonal, or with `idx` the row-normalised same-id matrix (soft
    targets); rows and columns of invalid examples are excluded.
    """
    n = feat_a.shape[0]
    logits = (feat_a @ feat_b.T) / temp
    valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
    pair_ok = valid[:, None] & valid[None, :]
    if idx is None:
        targets = jnp.eye(n, dtype=jnp.float32)
    else:
        targets = (idx[:, None] == idx[None, :]).astype(jnp.float32)
    targets = jnp.where(pair_ok, targets, 0.0)
    targets = targets / jnp.maximum(targets.sum(axis=1, keepdims=True), 1e-12)

    def soft_ce(lg, tg):
        lg = jnp.where(pair_ok, lg, -1e30)
        per_row = -jnp.sum(jax.nn.log_softmax(lg, axis=1) * tg, axis=1)
        return jnp.sum(jnp.where(valid, per_row, 0.0)) / jnp.maximum(valid.sum(), 1)

    return 0.5 * (soft_ce(logits, targets) + soft_ce(logits.T, targets))  # targets are symmetric


# ----------------------------------------------------------------------------------------------------------
# Hard-negative sampling
# ----------------------------------------------------------------------------------------------------------

def negative_weights(sim: jax.Array, idx: jax.Array | None = None) -> jax.Array:
    """Sampling weights softmax(sim) + 1e-5 with same-index (or same-id) entries zeroed; (B, B)."""
    weights = jax.nn.softmax(sim.astype(jnp.float32), axis=1) + NEG_EPS
    b = sim.shape[0]
    same = jnp.eye(b, dtype=bool) if idx is None else (idx[:, None] == idx[None, :])
    return jnp.where(same, 0.0, weights)


def sample_local_negatives(cond_feat: jax.Array, text_feat: jax.Array, temp: jax.Array, rng: jax.Array,
                           idx: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Draw one negative per example within this batch: (neg cond index per text, neg text index per cond).

    cond_feat, text_feat (B, E) normalised; indices are local to the given batch, each (B,) int32.
    """
    cond_feat, text_feat = jax.lax.stop_gradient(cond_feat), jax.lax.stop_gradient(text_feat)
    temp = jax.lax.stop_gradient(temp)
    w_t2i = negative_weights(text_feat @ cond_feat.T / temp, idx)
    w_i2t = negative_weights(cond_feat @ text_feat.T / temp, idx)
    k_t2i, k_i2t = jax.random.split(rng)
    neg_cond = jax.random.categorical(k_t2i, jnp.log(w_t2i), axis=1)
    neg_text = jax.random.categorical(k_i2t, jnp.log(w_i2t), axis=1)
    return neg_cond.astype(jnp.int32), neg_text.astype(jnp.int32)


def draw_negatives(ctx: Context, cond_feat, text_feat, temp, rng, idx=None) -> jax.Array:
    """(2B,) global indices [neg cond per text; neg text per cond], drawn within each data shard."""
    shards = ctx.batch_shards
    if shards == 1:
        neg_cond, neg_text = sample_local_negatives(cond_feat, text_feat, temp, rng, idx)
        return jnp.concatenate([neg_cond, neg_text])
    if cond_feat.shape[0] % shards:
        raise ValueError(f"batch of {cond_feat.shape[0]} does not split over {shards} data shards")
    local_b = cond_feat.shape[0] // shards

    def per_shard(cf, tf, t, key, ix):
        shard = jax.lax.axis_index(BATCH_AXES)
        key = jax.random.fold_in(key, shard)
        neg_cond, neg_text = sample_local_negatives(cf, tf, t, key, ix if idx is not None else None)
        offset = shard * local_b
        return neg_cond + offset, neg_text + offset

    batch_spec = PartitionSpec(BATCH_AXES)
    ix = idx if idx is not None else jnp.zeros(cond_feat.shape[:1], jnp.int32)
    neg_cond, neg_text = jax.shard_map(
        per_shard, mesh=ctx.mesh,
        in_specs=(batch_spec, batch_spec, PartitionSpec(), PartitionSpec(), batch_spec),
        out_specs=(batch_spec, batch_spec), check_vma=False)(cond_feat, text_feat, temp, rng, ix)
    return jnp.concatenate([neg_cond, neg_text])


def matching_loss(ctx: Context, cond_embeds, cond_atts, cond_feat, text_embeds, text_atts, text_feat, temp,
                  rng, negatives=None, idx=None, valid=None, dropout_rng=None) -> tuple[jax.Array, jax.Array]:
    """ITM/TTM: 2-way CE over B positives, B (negative cond, text) and B (cond, negative text) pairs.

    `cond_embeds` is the condition (B, Lc, Dc) or its cached per-layer cross keys/values (`fusion_condition`).
    Returns (loss, the (2B,) negative indices used).
    """
    b = text_embeds.shape[0]
    if negatives is None:
        negatives = draw_negatives(ctx, cond_feat, text_feat, temp, rng, idx)
    negatives = jnp.asarray(negatives, jnp.int32)
    neg_cond, neg_text = negatives[:b], negatives[b:]
    keys = jax.random.split(dropout_rng, 3) if dropout_rng is not None else (None,) * 3
    pos = ctx("fuse", cond_embeds, cond_atts, text_embeds, text_atts, rng=keys[0])[:, 0]
    take = lambda x, i: jax.tree.map(lambda a: jnp.take(jnp.asarray(a), i, axis=0), x)  # noqa: E731
    neg1 = ctx("fuse", take(cond_embeds, neg_cond), take(cond_atts, neg_cond), text_embeds, text_atts,
               rng=keys[1])[:, 0]
    neg2 = ctx("fuse", cond_embeds, cond_atts, take(text_embeds, neg_text), take(text_atts, neg_text),
               rng=keys[2])[:, 0]
    logits = ctx("itm_logits", jnp.concatenate([pos, neg1, neg2]))
    labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=1)[:, 0]
    weight = jnp.ones((b,), jnp.float32) if valid is None else valid.astype(jnp.float32)
    weight = jnp.concatenate([weight, weight, weight])
    return jnp.sum(ce * weight) / jnp.maximum(weight.sum(), 1.0), negatives


# ----------------------------------------------------------------------------------------------------------
# Masked language modelling
# ----------------------------------------------------------------------------------------------------------

def masked_token_loss(ctx: Context, hidden: jax.Array, labels: jax.Array, valid=None) -> jax.Array:
    """Mean CE over real masked positions; hidden (B, M, D) after the MLM transform, labels (B, M) (-100 pad).

    Logits exist only at the B*M masked positions, and with `mlm_chunk` only for that many at a time (also in
    the backward pass, which recomputes each chunk's logits).
    """
    b, m, d = hidden.shape
    mask = labels != IGNORE
    if valid is not None:
        mask = mask & valid.astype(bool)[:, None]
    flat_h, flat_y, flat_m = hidden.reshape(b * m, d), jnp.where(mask, labels, 0).reshape(-1), mask.reshape(-1)

    def chunk_nll(h, y):
        logits = ctx("mlm_decode", h)
        return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]

    chunk = ctx.mlm_chunk
    if chunk and chunk < b * m and (b * m) % chunk == 0:
        # Rematerialised per chunk: the backward pass keeps no chunk's logits, only (h, y).
        nll = jax.lax.map(jax.checkpoint(lambda xs: chunk_nll(*xs)),
                          (flat_h.reshape(-1, chunk, d), flat_y.reshape(-1, chunk)))
        nll = nll.reshape(-1)
    else:
        nll = chunk_nll(flat_h, flat_y)
    return jnp.sum(jnp.where(flat_m, nll, 0.0)) / jnp.maximum(flat_m.sum(), 1)


# ----------------------------------------------------------------------------------------------------------
# Views
# ----------------------------------------------------------------------------------------------------------

def fusion_condition(ctx: Context, cond_embeds: jax.Array):
    """What the fusion passes cross-attend to: the condition itself, or with `model.cache_cross_kv` its
    per-layer cross-attention keys/values, computed once here and reused by every pass (and gathered for
    the negatives)."""
    if ctx.model.config.get("cache_cross_kv", False):
        return ctx("cross_kv", cond_embeds)
    return cond_embeds


def _split(rng: jax.Array | None, n: int):
    return (None,) * n if rng is None else tuple(jax.random.split(rng, n))


def _context(model, params, config, mesh) -> tuple[Context, ml_collections.ConfigDict]:
    config = config or default_objectives_config()
    return Context(model, params, mesh, config.negatives, int(config.mlm_chunk)), config


def image_text_losses(model: CCLM, params, batch: Mapping[str, jax.Array], rng: jax.Array,
                      negatives: jax.Array | None = None, *, config: ml_collections.ConfigDict | None = None,
                      mesh: Mesh | None = None, dropout: bool = False) -> dict[str, jax.Array]:
    """Image–caption view: {itc, itm, mlm} (+ {ttc} with two captions), unweighted, plus `negatives`.

    `dropout=True` draws dropout/drop-path masks from `rng` (the model must be built non-deterministic).
    """
    ctx, config = _context(model, params, config, mesh)
    k_neg, k_img, k_txt, k_txt2, k_itm, k_mlm = _split(rng, 6)
    if not dropout:
        k_img = k_txt = k_txt2 = k_itm = k_mlm = None
    valid, idx = batch.get("valid"), batch.get("idx")
    image_embeds, image_atts = ctx("encode_image", batch["image"], rng=k_img)
    text_embeds = ctx("encode_text", batch["text_ids"], batch["text_atts"], rng=k_txt)
    image_feat, text_feat = ctx("features", image_embeds, text_embeds)
    temp = ctx("temperature")
    out = {"itc": contrastive_loss(image_feat, text_feat, temp, idx, valid)}
    if config.sample_2_captions:
        text_embeds_2 = ctx("encode_text", batch["text_ids_2"], batch["text_atts_2"], rng=k_txt2)
        text_feat_2 = ctx("text_features", text_embeds_2)
        out["itc"] = 0.5 * (out["itc"] + contrastive_loss(image_feat, text_feat_2, temp, idx, valid))
        out["ttc"] = contrastive_loss(text_feat, text_feat_2, temp, idx, valid)
    image_cond = fusion_condition(ctx, image_embeds)
    out["itm"], out["negatives"] = matching_loss(
        ctx, image_cond, image_atts, image_feat, text_embeds, batch["text_atts"], text_feat, temp, k_neg,
        negatives, idx, valid, k_itm)
    hidden = ctx("mlm_hidden", batch["text_ids_masked"], batch["text_atts"], image_cond, image_atts,
                 batch["masked_pos"], rng=k_mlm)
    out["mlm"] = masked_token_loss(ctx, hidden, batch["masked_ids"], valid)
    return out


def parallel_text_losses(model: CCLM, params, batch: Mapping[str, jax.Array], rng: jax.Array,
                         negatives: jax.Array | None = None, *, config: ml_collections.ConfigDict | None = None,
                         mesh: Mesh | None = None, dropout: bool = False) -> dict[str, jax.Array]:
    """Parallel-sentence view: {ttc, ttm, mlm} (or {ttc, tlm} with `use_tlm`), unweighted, plus `negatives`.

    Sentence 1 (`text_*`) plays the image's role: TTM queries with sentence 2 and cross-attends to sentence 1's
    text-encoder states; MLM predicts masked sentence 1 conditioned on sentence 2's states.
    """
    ctx, config = _context(model, params, config, mesh)
    k_neg, k_1, k_2, k_ttm, k_mlm = _split(rng, 5)
    if not dropout:
        k_1 = k_2 = k_ttm = k_mlm = None
    valid = batch.get("valid")
    temp = ctx("temperature")
    if config.use_tlm:
        _, atts, ids_masked, pos, labels = concat_pair_for_tlm(batch)
        emb_1 = ctx("encode_text", batch["text_ids"], batch["text_atts"], rng=k_1)
        emb_2 = ctx("encode_text", batch["text_ids_2"], batch["text_atts_2"], rng=k_2)
        out = {"ttc": contrastive_loss(ctx("text_features", emb_1), ctx("text_features", emb_2), temp,
                                       None, valid)}
        hidden = ctx("tlm_hidden", ids_masked, atts, pos, rng=k_mlm)
        out["tlm"] = masked_token_loss(ctx, hidden, labels, valid)
        return out
    emb_1 = ctx("encode_text", batch["text_ids"], batch["text_atts"], rng=k_1)
    emb_2 = ctx("encode_text", batch["text_ids_2"], batch["text_atts_2"], rng=k_2)
    feat_1, feat_2 = ctx("text_features", emb_1), ctx("text_features", emb_2)
    out = {"ttc": contrastive_loss(feat_1, feat_2, temp, None, valid)}
    out["ttm"], out["negatives"] = matching_loss(
        ctx, fusion_condition(ctx, emb_1), batch["text_atts"], feat_1, emb_2, batch["text_atts_2"], feat_2, temp,
        k_neg, negatives, None, valid, k_ttm)
    hidden = ctx("mlm_hidden", batch["text_ids_masked"], batch["text_atts"], fusion_condition(ctx, emb_2),
                 batch["text_atts_2"], batch["masked_pos"], rng=k_mlm)
    out["mlm"] = masked_token_loss(ctx, hidden, batch["masked_ids"], valid)
    return out


# ----------------------------------------------------------------------------------------------------------
# Region grounding (the 4M setting)
# ----------------------------------------------------------------------------------------------------------

def box_cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
    """(..., 4) (cx, cy, w, h) -> (x0, y0, x1, y1), same units."""
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def paired_giou(boxes_a: jax.Array, boxes_b: jax.Array) -> jax.Array:
    """Generalized IoU of row i of `boxes_a` with row i of `boxes_b`; (R, 4) xyxy each -> (R,).

    GIoU = IoU - (C - U) / C with U the union and C the smallest enclosing box's area. As the reference, no
    epsilon: a zero-area union or enclosing box gives NaN (the data keeps only boxes of positive area).
    """
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    lt = jnp.maximum(boxes_a[:, :2], boxes_b[:, :2])
    rb = jnp.minimum(boxes_a[:, 2:], boxes_b[:, 2:])
    wh = jnp.clip(rb - lt, 0.0)
    inter = wh[:, 0] * wh[:, 1]
    union = area(boxes_a) + area(boxes_b) - inter
    lt_c = jnp.minimum(boxes_a[:, :2], boxes_b[:, :2])
    rb_c = jnp.maximum(boxes_a[:, 2:], boxes_b[:, 2:])
    wh_c = jnp.clip(rb_c - lt_c, 0.0)
    enclosing = wh_c[:, 0] * wh_c[:, 1]
    return inter / union - (enclosing - union) / enclosing


def box_losses(pred: jax.Array, target: jax.Array, is_image: jax.Array,
               valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(bbox, giou) losses of predicted vs target boxes, each (R, 4) (cx, cy, w, h) normalised to [0, 1].

    bbox = sum over region rows of |pred - target| summed over the 4 coordinates, giou = sum of (1 - GIoU), both
    divided by the number of region rows; whole-image rows (`is_image` 1) and invalid rows count for nothing. As
    the reference (`get_bbox_loss`): when any row's predicted or target box is degenerate (x1 < x0 or y1 < y0) the
    giou loss is 0 for the whole batch, with no gradient. Deliberate difference: a batch without region rows
    gives 0, not the reference's 0/0 = NaN.
    """
    weight = 1.0 - is_image.astype(jnp.float32)
    live = jnp.ones_like(weight, dtype=bool) if valid is None else valid.astype(bool)
    weight = jnp.where(live, weight, 0.0)
    num_boxes = jnp.maximum(weight.sum(), 1.0)
    l1 = jnp.abs(pred - target).sum(axis=1)
    xyxy_pred, xyxy_target = box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target)
    bad = lambda b: jnp.any((b[:, 2:] < b[:, :2]) & live[:, None])  # noqa: E731
    degenerate = bad(xyxy_pred) | bad(xyxy_target)
    unit = jnp.array([0.0, 0.0, 1.0, 1.0], xyxy_pred.dtype)
    # Evaluated on harmless boxes when degenerate, so neither the value nor the gradient can carry a NaN.
    giou = paired_giou(jnp.where(degenerate, unit, xyxy_pred), jnp.where(degenerate, unit, xyxy_target))
    giou_rows = jnp.where(degenerate, 0.0, 1.0 - giou)
    return jnp.sum(l1 * weight) / num_boxes, jnp.sum(giou_rows * weight) / num_boxes


def region_losses(model: CCLM, params, batch: Mapping[str, jax.Array], rng: jax.Array,
                  negatives: jax.Array | None = None, *, config: ml_collections.ConfigDict | None = None,
                  mesh: Mesh | None = None, dropout: bool = False) -> dict[str, jax.Array]:
    """Region view (X-VLM grounding, CCLM-4M): {itc, itm, mlm, bbox, giou}, unweighted, plus `negatives`.

    Batch (N images, R rows; the golden_region conventions): `image` (N, H, W, 3) or (N, 3, H, W) normalised;
    `idx_to_group_img` (R,) int, the image of each row; `image_atts` (R, 1 + P) {0, 1}: token 0 (always 1) and
    the patches the row's box overlaps (all ones for a whole-image caption row); `target_bbox` (R, 4) float
    (cx, cy, w, h) / image size; `is_image` (R,) int, 1 for whole-image caption rows; the five text keys (R, .);
    optional `valid` (R,) bool (padding rows count in no loss). Each image is encoded once; rows gather theirs
    (`models.regions.pool_regions`). ITC uses the region token, ITM and MLM cross-attend to the region embeddings
    under the row's `image_atts`, the box head reads the fusion CLS over the full image (all-ones mask). Every
    other row is a negative for ITC/ITM, other rows of the same image included (as the reference).
    `negatives` (2R,) row indices in the golden `region_negs_t2i_then_i2t` layout.

    Any model with the methods `encode_image`, `encode_text`, `features`, `temperature`, `fuse`, `itm_logits`,
    `mlm_hidden`, `mlm_decode` and `bbox` (cls (R, D) -> (R, 4) in [0, 1]) works, whatever its image tower, as
    long as `encode_image` returns (N, 1 + P, D) with the P patches in the order `image_atts` uses.
    """
    ctx, config = _context(model, params, config, mesh)
    k_neg, k_img, k_txt, k_itm, k_mlm, k_box = _split(rng, 6)
    if not dropout:
        k_img = k_txt = k_itm = k_mlm = k_box = None
    valid = batch.get("valid")
    image_atts = jnp.asarray(batch["image_atts"]).astype(jnp.int32)
    image_embeds, _ = ctx("encode_image", batch["image"], rng=k_img)
    region_embeds, full_embeds = pool_regions(image_embeds, jnp.asarray(batch["idx_to_group_img"]), image_atts)
    text_embeds = ctx("encode_text", batch["text_ids"], batch["text_atts"], rng=k_txt)
    region_feat, text_feat = ctx("features", region_embeds, text_embeds)
    temp = ctx("temperature")
    out = {"itc": contrastive_loss(region_feat, text_feat, temp, None, valid)}
    region_cond = fusion_condition(ctx, region_embeds)
    out["itm"], out["negatives"] = matching_loss(
        ctx, region_cond, image_atts, region_feat, text_embeds, batch["text_atts"], text_feat, temp, k_neg,
        negatives, None, valid, k_itm)
    hidden = ctx("mlm_hidden", batch["text_ids_masked"], batch["text_atts"], region_cond, image_atts,
                 batch["masked_pos"], rng=k_mlm)
    out["mlm"] = masked_token_loss(ctx, hidden, batch["masked_ids"], valid)
    cls = ctx("fuse", full_embeds, jnp.ones(full_embeds.shape[:2], jnp.int32), text_embeds, batch["text_atts"],
              rng=k_box)[:, 0]
    pred = ctx("bbox", cls)
    out["bbox"], out["giou"] = box_losses(pred, jnp.asarray(batch["target_bbox"], jnp.float32),
                                          jnp.asarray(batch["is_image"]), valid)
    return out


def concat_pair_for_tlm(batch: Mapping[str, jax.Array]):
    """`<s> s1 </s> s2 </s>` from two `<s> .. </s>` sentences, with both sentences' masks carried over.

    Returns ids, atts, ids_masked (B, L1+L2-1), masked_pos (B, M1+M2) and labels (B, M1+M2) (-100 padded).
    """
    ids1, ids2 = batch["text_ids"], batch["text_ids_2"]
    n1 = batch["text_atts"].sum(axis=1)
    n2 = batch["text_atts_2"].sum(axis=1)
    length = ids1.shape[1] + ids2.shape[1] - 1
    j = jnp.arange(length)[None, :]
    in_1 = j < n1[:, None]
    in_2 = (~in_1) & (j < (n1 + n2 - 1)[:, None])
    j2 = jnp.clip(j - n1[:, None] + 1, 0, ids2.shape[1] - 1)
    j1 = jnp.clip(j, 0, ids1.shape[1] - 1)

    def merge(a, b, pad):
        return jnp.where(in_1, jnp.take_along_axis(a, j1, 1),
                         jnp.where(in_2, jnp.take_along_axis(b, j2, 1), pad))

    ids = merge(ids1, ids2, 1)
    ids_masked = merge(batch["text_ids_masked"], batch["text_ids_masked_2"], 1)
    atts = (in_1 | in_2).astype(jnp.int32)
    pos2 = batch["masked_pos_2"] + n1[:, None] - 1
    labels2 = batch["masked_ids_2"]
    pos2 = jnp.where(labels2 == IGNORE, 0, pos2)
    return (ids, atts, ids_masked, jnp.concatenate([batch["masked_pos"], pos2], axis=1),
            jnp.concatenate([batch["masked_ids"], labels2], axis=1))


def weighted_total(losses: Mapping[str, jax.Array], config: ml_collections.ConfigDict | None,
                   mesh: Mesh | None = None) -> jax.Array:
    """Sum of the configured weights times each loss term (the `negatives` entry is ignored)."""
    config = config or default_objectives_config()
    scale = 1.0
    if config.contrastive_scale == "reference" and mesh is not None:
        scale = 1.0 / float(mesh.shape["data"] * mesh.shape["fsdp"])
    total = 0.0
    for name, value in losses.items():
        if name == "negatives":
            continue
        w = float(config.weights[name]) * (scale if name in ("itc", "ttc") else 1.0)
        total = total + w * value
    return total
