"""Model configurations (the `model` section of a run config) and their validation.

`base_model_config()` is the released CCLM (Swin-B 224 + 12 layers of XLM-R-large, 525,677,393 parameters);
`tiny_model_config()` has the golden fixture's sizes. Fields:

- `vision`: image_res (px), patch_size, embed_dim (stage-0 width), depths, num_heads (per stage),
  window_size, mlp_ratio, drop_path_rate (max stochastic-depth rate, linear over all blocks).
- `text`: vocab_size (-1: the tokenizer's, resolved at the start of training), hidden_size, num_heads, intermediate_size, num_layers, fusion_layer (first layer with
  cross-attention), max_position_embeddings, type_vocab_size, layer_norm_eps, hidden_dropout,
  attention_dropout, pad_token_id, mask_token_id.
- `embed_dim`: contrastive projection width; `temp`: initial temperature.
- `dtype`: compute dtype ('float32' | 'bfloat16'); parameters are always float32.
- `remat`: rematerialise each Swin block and text layer in the backward pass.
- `attention_impl`: text attention through 'xla' (explicit einsums, the reference's numerics) or
  'dot_product' (`jax.nn.dot_product_attention`: cuDNN flash attention on GPU for bf16/fp16; used only where
  attention dropout is inactive, i.e. in eval or with `text.attention_dropout=0`; Swin windows stay 'xla').
- `cache_cross_kv`: the objectives compute each fusion layer's cross-attention keys/values of a condition once
  and reuse them in the positive, negative and MLM fusion passes (same numbers, fewer FLOPs).
- `scan_layers`: run the text layers, the fusion layers and every Swin stage of >= 4 blocks (as block pairs) as
  `lax.scan` loops over their parameters stacked on the fly (smaller programs, faster compiles; the parameter
  tree is unchanged).
"""
from __future__ import annotations

import ml_collections

from cclm_jax.models.cclm import DTYPES
from cclm_jax.models.common import ATTENTION_IMPLS


def base_model_config() -> ml_collections.ConfigDict:
    """The released CCLM base model (pre-training at 224 px)."""
    return ml_collections.ConfigDict({
        "vision": {
            "image_res": 224, "patch_size": 4, "embed_dim": 128, "depths": (2, 2, 18, 2),
            "num_heads": (4, 8, 16, 32), "window_size": 7, "mlp_ratio": 4.0, "drop_path_rate": 0.1,
        },
        "text": {
            "vocab_size": 250002, "hidden_size": 1024, "num_heads": 16, "intermediate_size": 4096,
            "num_layers": 12, "fusion_layer": 6, "max_position_embeddings": 514, "type_vocab_size": 1,
            "layer_norm_eps": 1e-5, "hidden_dropout": 0.1, "attention_dropout": 0.1,
            "pad_token_id": 1, "mask_token_id": 250001,
        },
        "embed_dim": 256,
        "temp": 0.07,
        "dtype": "float32",
        "remat": False,
        "attention_impl": "xla",
        "cache_cross_kv": False,
        "scan_layers": False,
    })


def tiny_model_config() -> ml_collections.ConfigDict:
    """The golden fixture's sizes: every structural knob of the real model, widths shrunk."""
    cfg = base_model_config()
    cfg.vision.update(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
    cfg.text.update(vocab_size=1000, hidden_size=128, num_heads=4, intermediate_size=256,
                    mask_token_id=999)
    cfg.embed_dim = 32
    return cfg


def validate_model_config(cfg: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the offending field when the architecture cannot be built."""
    v, t = cfg.vision, cfg.text
    n_stages = len(v.depths)
    errors = []
    if len(v.num_heads) != n_stages:
        errors.append(f"model.vision.num_heads has {len(v.num_heads)} entries, depths has {n_stages}")
    width = v.embed_dim * 2 ** (n_stages - 1)
    if width != t.hidden_size:
        errors.append(
            f"vision width {width} (model.vision.embed_dim * 2^(stages-1)) must equal model.text.hidden_size "
            f"{t.hidden_size}: the fusion layers' cross-attention serves image tokens and sentence states alike")
    grid = v.image_res // v.patch_size
    if v.image_res % v.patch_size or grid % 2 ** (n_stages - 1):
        errors.append(f"model.vision.image_res {v.image_res} must be divisible by patch_size * "
                      f"2^(stages-1) = {v.patch_size * 2 ** (n_stages - 1)}")
    else:
        for s in range(n_stages):
            res = grid // 2 ** s
            if res > v.window_size and res % v.window_size:
                errors.append(f"stage {s} resolution {res} is not divisible by model.vision.window_size "
                              f"{v.window_size}")
    for s, (heads, dim) in enumerate(zip(v.num_heads, [v.embed_dim * 2 ** i for i in range(n_stages)])):
        if dim % heads:
            errors.append(f"stage {s} width {dim} is not divisible by model.vision.num_heads[{s}]={heads}")
    if t.hidden_size % t.num_heads:
        errors.append(f"model.text.hidden_size {t.hidden_size} is not divisible by num_heads {t.num_heads}")
    if not 0 < t.fusion_layer < t.num_layers:
        errors.append(f"model.text.fusion_layer {t.fusion_layer} must be in (0, num_layers={t.num_layers})")
    if t.vocab_size == -1:  # resolved from the tokenizer when training starts
        if t.mask_token_id != -1:
            errors.append("model.text.mask_token_id must be -1 when vocab_size is -1 (both come from the tokenizer)")
    elif not 0 <= t.mask_token_id < t.vocab_size:
        errors.append(f"model.text.mask_token_id {t.mask_token_id} outside the vocabulary [0, {t.vocab_size})")
    if cfg.dtype not in DTYPES:
        errors.append(f"model.dtype {cfg.dtype!r} is not one of {sorted(DTYPES)}")
    if cfg.get("attention_impl", "xla") not in ATTENTION_IMPLS:
        errors.append(f"model.attention_impl {cfg.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    for switch in ("cache_cross_kv", "scan_layers"):
        if not isinstance(cfg.get(switch, False), bool):
            errors.append(f"model.{switch} must be True or False, got {cfg[switch]!r}")
    if errors:
        raise ValueError("invalid model config:\n  " + "\n  ".join(errors))
