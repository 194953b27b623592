"""Analytic model FLOPs per example for CCLM's two pre-training batch kinds, and chips' peaks (for MFU).

Accounting (every number is FLOPs = 2 x multiply-adds; only matrix products are counted):
- dense layers: 2 * in * out per token (biases, LayerNorm, GELU, softmax, residual adds are left out: they are
  < 1% of the base model's count and are memory-bound anyway);
- attention: 2 * Lq * Lk * D for the scores plus the same for the weighted values (per layer, per example);
- ViT (CCLM-X2VLM): the patch convolution, per block qkv/proj/MLP and global attention over G^2 + 1 tokens;
  CCLM-X2VLM's fusion passes run its cross encoder (`model.cross` layers) and its MLM decoder is untied (same
  count);
- Swin: the 4x4 patch-embedding convolution, per block qkv/proj/MLP on every token plus window attention over
  window^2 keys, PatchMerging's 4C -> 2C reduction; mean pooling, masks and the relative-position bias are free;
- text layer: q, k, v, output (4 D^2) and the FFN (2 D F) per token plus self-attention; a fusion layer adds
  cross-attention: q and output projections per text token, k and v projections per *condition* token
  (D_cond -> D) and cross scores/values over the condition's Lc tokens;
- heads: the MLM transform (D^2) and the tied decoder (D x vocab) at the `masks` gathered positions only,
  contrastive projections (one per encoded sequence), the ITM MLP on the 3 fused CLS vectors (B positives +
  2B negatives per B examples);
- not counted: the contrastive logits and the negative-sampling similarities (2 * B * embed_dim per example
  each, so they scale with the batch; 0.05% of the base count at batch 128), embedding lookups, the optimizer;
- training = 3 x forward (the backward pass costs two forward passes); remat recomputation is not model FLOPs.

Per example (image–caption, `tokens` = caption length, `masks` = masked positions):
  Swin(image) + encode(tokens) + 3 x fuse(tokens | image tokens) + [encode + fuse](tokens | image tokens)
  + MLM head(masks) + projections + ITM head.
Per example (sentence pair, both sentences `tokens` long):
  2 x encode(tokens) + 3 x fuse(tokens | tokens) + [encode + fuse](tokens | tokens) + MLM head(masks) + ...

With `cache_cross_kv=True` (the model's K/V reuse switch) the cross-attention keys/values of a condition are
computed once per fusion layer instead of once per fusion pass: the image tokens' K/V serve the positive,
negative-image (gathered) and negative-text ITM passes and the MLM pass (4 -> 1), sentence 1's serve the three
TTM passes (3 -> 1; the MLM pass conditions on sentence 2). `model_flops` (the MFU numerator) is always the
reference computation, without the cache: the cache is an implementation saving, like remat is a cost.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import ml_collections

KINDS = ("image_caption", "parallel_text")


@dataclasses.dataclass(frozen=True)
class TextShapes:
    """Sequence shapes of one batch kind: `tokens` per sentence/caption, `masks` MLM positions per example."""

    tokens: int
    masks: int


# The reference's padded shapes (CCLM_SPEC §2.3): captions 40 tokens / 12 masks, sentences 64 / 20.
REFERENCE_SHAPES = {"image_caption": TextShapes(40, 12), "parallel_text": TextShapes(64, 20)}


def dense(tokens: int, fan_in: int, fan_out: int) -> int:
    """FLOPs of a dense layer applied to `tokens` vectors."""
    return 2 * tokens * fan_in * fan_out


def attention_scores_values(queries: int, keys: int, width: int) -> int:
    """FLOPs of q.k^T and probs.v for `queries` x `keys` over all heads of total `width`."""
    return 2 * (2 * queries * keys * width)


# ------------------------------------------------------------------------------------------------- vision

def swin_flops(vision: ml_collections.ConfigDict) -> int:
    """Forward FLOPs of the Swin image tower for one image (`model.vision` config)."""
    res = vision.image_res // vision.patch_size
    width = vision.embed_dim
    total = dense(res * res, 3 * vision.patch_size ** 2, width)  # patch embedding conv
    n_stages = len(vision.depths)
    for stage, depth in enumerate(vision.depths):
        tokens = res * res
        window = min(vision.window_size, res)
        hidden = int(width * vision.mlp_ratio)
        per_block = (dense(tokens, width, 3 * width) + dense(tokens, width, width)
                     + attention_scores_values(tokens, window * window, width)
                     + dense(tokens, width, hidden) + dense(tokens, hidden, width))
        total += depth * per_block
        if stage < n_stages - 1:
            res //= 2
            total += dense(res * res, 4 * width, 2 * width)  # PatchMerging reduction
            width *= 2
    return total


def vit_flops(vision: ml_collections.ConfigDict) -> int:
    """Forward FLOPs of a ViT tower (`models.vit`) for one image: patch conv, then per block qkv/proj/MLP on the
    G^2 + 1 tokens and global attention over them (layer scale, pooling and position terms are free)."""
    grid = vision.image_res // vision.patch_size
    tokens, width = grid * grid + 1, vision.embed_dim
    hidden = int(width * vision.mlp_ratio)
    per_block = (dense(tokens, width, 4 * width) + attention_scores_values(tokens, tokens, width)
                 + dense(tokens, width, hidden) + dense(tokens, hidden, width))
    return dense(grid * grid, 3 * vision.patch_size ** 2, width) + vision.depth * per_block


def image_tower_flops(vision: ml_collections.ConfigDict) -> int:
    """Forward FLOPs of the configured image tower (Swin or ViT) for one image."""
    return vit_flops(vision) if vision.get("kind", "swin") == "vit" else swin_flops(vision)


def vision_tokens(vision: ml_collections.ConfigDict) -> int:
    """Image tokens the fusion layers attend to: 1 pooled/CLS token + the patches (Swin: (res / (patch *
    2^(stages-1)))^2; ViT: (res / patch)^2)."""
    if vision.get("kind", "swin") == "vit":
        return 1 + (vision.image_res // vision.patch_size) ** 2
    side = vision.image_res // vision.patch_size // 2 ** (len(vision.depths) - 1)
    return 1 + side * side


def fusion_stack(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The text-config view of the fusion layers `fuse_flops` reads: CCLM's own text stack, or CCLM-X2VLM's cross
    encoder (`model.cross` layers at the text width, all of them fusion layers)."""
    if "cross" not in model:
        return model.text
    return ml_collections.ConfigDict({"hidden_size": model.text.hidden_size,
                                      "intermediate_size": model.cross.intermediate_size,
                                      "num_layers": model.cross.num_layers, "fusion_layer": 0})


# --------------------------------------------------------------------------------------------------- text

def text_layer_flops(text: ml_collections.ConfigDict, tokens: int) -> int:
    """One text-encoder layer (self-attention + FFN) over `tokens` tokens."""
    d, f = text.hidden_size, text.intermediate_size
    return (dense(tokens, d, 4 * d) + attention_scores_values(tokens, tokens, d)
            + dense(tokens, d, f) + dense(tokens, f, d))


def cross_kv_flops(text: ml_collections.ConfigDict, cond_tokens: int, cond_width: int) -> int:
    """The key and value projections of one fusion layer's cross-attention over the condition tokens."""
    return dense(cond_tokens, cond_width, 2 * text.hidden_size)


def fusion_layer_flops(text: ml_collections.ConfigDict, tokens: int, cond_tokens: int, cond_width: int,
                       with_cross_kv: bool = True) -> int:
    """One fusion layer: a text layer + cross-attention (q/out projections, scores/values, and K/V if asked)."""
    d = text.hidden_size
    cross = dense(tokens, d, 2 * d) + attention_scores_values(tokens, cond_tokens, d)
    if with_cross_kv:
        cross += cross_kv_flops(text, cond_tokens, cond_width)
    return text_layer_flops(text, tokens) + cross


def encode_flops(text: ml_collections.ConfigDict, tokens: int) -> int:
    """The text encoder (layers [0, fusion_layer)) over one sequence."""
    return text.fusion_layer * text_layer_flops(text, tokens)


def fuse_flops(text: ml_collections.ConfigDict, tokens: int, cond_tokens: int, cond_width: int,
               with_cross_kv: bool = True) -> int:
    """The fusion layers [fusion_layer, num_layers) over one sequence cross-attending to a condition."""
    layers = text.num_layers - text.fusion_layer
    return layers * fusion_layer_flops(text, tokens, cond_tokens, cond_width, with_cross_kv)


def mlm_head_flops(text: ml_collections.ConfigDict, masks: int) -> int:
    """MLM transform + tied decoder over the vocabulary, at `masks` positions."""
    d = text.hidden_size
    return dense(masks, d, d) + dense(masks, d, text.vocab_size)


def itm_head_flops(width: int) -> int:
    """The ITM MLP (D -> 2D -> 2) on the 3 fused CLS vectors of one example (1 positive + 2 negatives)."""
    return 3 * (dense(1, width, 2 * width) + dense(1, 2 * width, 2))


# ------------------------------------------------------------------------------------------------ per kind

def forward_breakdown(model: ml_collections.ConfigDict, kind: str, shapes: TextShapes | None = None,
                      cache_cross_kv: bool = False) -> dict[str, int]:
    """Forward FLOPs per example of one batch kind, by part (keys: vision, text_encode, itm_fusion,
    mlm_stack, mlm_head, heads). `shapes` defaults to the reference shapes of that kind."""
    if kind not in KINDS:
        raise ValueError(f"batch kind must be one of {KINDS}, got {kind!r}")
    shapes = shapes or REFERENCE_SHAPES[kind]
    t, n = model.text, shapes.tokens
    d, e = t.hidden_size, model.embed_dim
    if kind == "image_caption":
        cond_tokens, cond_width = vision_tokens(model.vision), d
        vision = image_tower_flops(model.vision)
        encodes, projections = 1, 2
        kv_computations = 1 if cache_cross_kv else 4  # pos, neg image, neg text, MLM
    else:
        cond_tokens, cond_width = n, d
        vision = 0
        encodes, projections = 2, 2
        kv_computations = 2 if cache_cross_kv else 4  # sentence 1 for the 3 TTM passes, sentence 2 for MLM
    fusion = fusion_stack(model)
    fuse_no_kv = fuse_flops(fusion, n, cond_tokens, cond_width, with_cross_kv=False)
    kv = (fusion.num_layers - fusion.fusion_layer) * cross_kv_flops(fusion, cond_tokens, cond_width)
    return {
        "vision": vision,
        "text_encode": encodes * encode_flops(t, n),
        "itm_fusion": 3 * fuse_no_kv,
        "mlm_stack": encode_flops(t, n) + fuse_no_kv,
        "cross_kv": kv_computations * kv,
        "mlm_head": mlm_head_flops(t, shapes.masks),
        "heads": projections * dense(1, d, e) + itm_head_flops(d),
    }


def forward_flops(model: ml_collections.ConfigDict, kind: str, shapes: TextShapes | None = None,
                  cache_cross_kv: bool = False) -> int:
    """Forward FLOPs per example of one batch kind (sum of `forward_breakdown`)."""
    return sum(forward_breakdown(model, kind, shapes, cache_cross_kv).values())


def model_flops(model: ml_collections.ConfigDict, kind: str, shapes: TextShapes | None = None) -> int:
    """Training model FLOPs per example (3 x forward, reference computation): the MFU numerator."""
    return 3 * forward_flops(model, kind, shapes)


def run_config_shapes(config: ml_collections.ConfigDict) -> dict[str, TextShapes]:
    """Per-kind shapes from a run config's `data` section (max_tokens / max_masks of each source)."""
    data = config.data
    return {"image_caption": TextShapes(data.image_caption.max_tokens, data.image_caption.max_masks),
            "parallel_text": TextShapes(data.parallel_text.max_tokens, data.parallel_text.max_masks)}


def run_model_flops(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Training model FLOPs per example of each batch kind at a run config's shapes: what `describe` prints and
    the training metrics count (`train/<kind>/model_tflop_per_step` = this x the global batch)."""
    shapes = run_config_shapes(config)
    return {kind: model_flops(config.model, kind, shapes[kind]) for kind in KINDS}


def describe(config: ml_collections.ConfigDict) -> str:
    """Lines for `cclm-jax info`: training GFLOPs per example of each batch kind at the config's shapes. A
    fine-tuning config (one with `task`) gets a line saying its task is not modelled here."""
    if "task" in config:
        return (f"FLOPs: not modelled for the fine-tuning task {config.task!r} (this count covers the two "
                "pre-training views)")
    shapes = run_config_shapes(config)
    per_example = run_model_flops(config)
    lines = []
    for kind in KINDS:
        s = shapes[kind]
        train = per_example[kind]
        cached = 3 * forward_flops(config.model, kind, s, cache_cross_kv=True)
        lines.append(f"{kind}: {train / 1e9:.1f} GFLOPs/example training (3 x forward; {s.tokens} tokens, "
                     f"{s.masks} masks); {cached / 1e9:.1f} executed with model.cache_cross_kv")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- chips' peaks

# Dense bf16 peak per chip, TFLOP/s (vendor data sheets, no sparsity). Matched in order, as a case-insensitive
# substring of `jax.Device.device_kind` (e.g. "TPU v5 lite" = v5e, "TPU v6 lite" = v6e, "NVIDIA H100 80GB HBM3").
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("GH200", 989.4),
    ("H200", 989.4),
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5", 459.0),  # v5p
    ("TPU v6 lite", 918.0),  # v6e (Trillium)
    ("TPU v6e", 918.0),
)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one chip of `device_kind` (`jax.Device.device_kind`) from `PEAK_TFLOPS`, or None
    for a chip that is not listed (CPUs included): MFU is then not reported."""
    kind = device_kind.lower()
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in kind:
            return tflops * 1e12
    return None


# ------------------------------------------------------------------------------------ cross-check with XLA

_NAME = r'@("[^"]+"|[\w.$-]+)'
_FUNC = re.compile(r"func\.func (?:public |private )?" + _NAME + r"\(")
_CALL = re.compile(r"call " + _NAME + r"\(")
_TENSOR = re.compile(r"tensor<([0-9x]*)x?[a-z]+[0-9]*>")
_DOT_CONTRACT = re.compile(r"contracting_dims = \[([0-9, ]*)\] x")
_CONV_KERNEL = re.compile(r"dim_numbers = \[[^\]]*\]x\[([^\]]*)\]")


def _dims(spec: str) -> list[int]:
    return [int(d) for d in spec.split("x") if d]


def _op_flops(line: str) -> int:
    shapes = [_dims(m) for m in _TENSOR.findall(line.split(" : ", 1)[1])]
    lhs, rhs, out = shapes[0], shapes[1], shapes[-1]
    if "stablehlo.dot_general" in line:
        contract = [int(i) for i in _DOT_CONTRACT.search(line).group(1).split(",") if i.strip()]
        return 2 * math.prod(out) * math.prod(lhs[i] for i in contract)
    if "feature_group_count = 1 " not in line:
        raise ValueError(f"grouped convolutions are not counted: {line.strip()[:200]}")
    kernel_axes = [a.strip() for a in _CONV_KERNEL.search(line).group(1).split(",")]
    return 2 * math.prod(out) * math.prod(rhs) // rhs[kernel_axes.index("o")]


def stablehlo_matmul_flops(module_text: str) -> int:
    """FLOPs of every dot_general and convolution in a lowered StableHLO module (`jit(f).lower(...).as_text()`),
    following `call`s (a function called k times counts k times). Same accounting as this module's count."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in module_text.splitlines():
        match = _FUNC.search(line)
        if match:
            current = match.group(1)
            bodies[current] = []
        elif current is not None:
            bodies[current].append(line)

    @functools.cache
    def total(name: str) -> int:
        count = 0
        for line in bodies[name]:
            if "stablehlo.dot_general" in line or "stablehlo.convolution" in line:
                count += _op_flops(line)
            for callee in _CALL.findall(line):
                count += total(callee)
        return count

    return total("main")
