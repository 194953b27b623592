"""Model configurations (the `model` section of a run config) and their validation.

`base_model_config()` is the released CCLM (Swin-B 224 + 12 layers of XLM-R-large, 525,677,393 parameters);
`tiny_model_config()` has the golden fixture's sizes; `x2vlm_model_config(size)` is CCLM-X2VLM. Fields:

- `vision`: kind ('swin', the default when absent, or 'vit'); Swin: image_res (px), patch_size, embed_dim
  (stage-0 width), depths, num_heads (per stage), window_size, mlp_ratio, drop_path_rate (max stochastic-depth
  rate, linear over all blocks), ape (a learned absolute position embedding after the patch embedding, as the
  official Swin's option; False in CCLM); ViT (`vit_vision_config`, `models/vit.py`): image_res, patch_size, embed_dim
  (width), depth, num_heads, mlp_ratio, drop_path_rate, layer_norm_eps, qkv_bias ('qv' | 'qkv' | 'none'),
  rel_pos_bias, pos_grid (stored absolute-position grid side, 0: none), layer_scale_init (0: none),
  pool ('mean' | 'cls'). Both: frozen (a locked image tower, LiT: no gradient reaches it; pair it with a zero
  weight-decay row for `vision_encoder/.*`, as `configs/small_real.py` does; retrieval fine-tuning without
  augmentation then encodes each training image once, `tasks.locked_tower`).
- `cross` (CCLM-X2VLM only, `x2vlm_model_config`; its presence selects `models.x2vlm.X2VLM`): num_layers,
  num_heads, intermediate_size, layer_norm_eps of the separate cross encoder.
- `text`: vocab_size (-1: the tokenizer's, resolved at the start of training), hidden_size, num_heads,
  intermediate_size, num_layers, fusion_layer (first layer with cross-attention), max_position_embeddings,
  type_vocab_size, layer_norm_eps, hidden_dropout, attention_dropout, pad_token_id, mask_token_id, pool ('cls':
  the first token's state after the text layers feeds ITC and starts the fusion stack, as in CCLM; 'mean': that
  slot carries the masked mean of the sentence's states instead, for text towers trained with mean pooling such
  as e5, whose CLS state is the same for every sentence; CCLM only).
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
            "ape": False, "frozen": False,
        },
        "text": {
            "vocab_size": 250002, "hidden_size": 1024, "num_heads": 16, "intermediate_size": 4096,
            "num_layers": 12, "fusion_layer": 6, "max_position_embeddings": 514, "type_vocab_size": 1,
            "layer_norm_eps": 1e-5, "hidden_dropout": 0.1, "attention_dropout": 0.1,
            "pad_token_id": 1, "mask_token_id": 250001, "pool": "cls",
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


def vit_vision_config(variant: str, size: str) -> ml_collections.ConfigDict:
    """`model.vision` of a ViT tower (`models.vit`): variant 'beit2' (X2-VLM's BEiT-v2, mean pooling) or 'dinov2'
    (HF Dinov2Model: CLS token, absolute positions stored at 37x37 = 518 px / 14); size 'small' (384 x 12,
    6 heads), 'base' (768 x 12, 12 heads) or 'large' (1024 x 24, 16 heads)."""
    width, depth, heads = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}[size]
    fields = {"kind": "vit", "image_res": 224, "embed_dim": width, "depth": depth, "num_heads": heads,
              "mlp_ratio": 4.0, "layer_norm_eps": 1e-6, "frozen": False}
    if variant == "beit2":
        fields.update(patch_size=16, drop_path_rate=0.1, qkv_bias="qv", rel_pos_bias=True, pos_grid=0,
                      layer_scale_init=0.1, pool="mean")
    elif variant == "dinov2":
        fields.update(patch_size=14, drop_path_rate=0.0, qkv_bias="qkv", rel_pos_bias=False, pos_grid=37,
                      layer_scale_init=1.0, pool="cls")
    else:
        raise ValueError(f"unknown ViT variant {variant!r}; expected 'beit2' or 'dinov2'")
    return ml_collections.ConfigDict(fields)


def x2vlm_model_config(size: str = "base") -> ml_collections.ConfigDict:
    """CCLM-X2VLM (`models.x2vlm`): BEiT-v2 + XLM-R + a 6-layer BERT cross encoder, untied MLM head.

    size 'base' (BEiT-v2-B/16, XLM-R base, cross 768 wide: 615,540,825 parameters), 'large' (BEiT-v2-L/16,
    XLM-R large, cross 1024 wide) or 'tiny' (the golden fixture's sizes: 128 wide, 2 vision blocks, 4 text
    layers, 2 cross layers, vocabulary 1000). Fields as `base_model_config` plus `model.cross`: num_layers,
    num_heads, intermediate_size, layer_norm_eps (1e-12: a BertConfig); `text.fusion_layer` = num_layers.
    """
    if size not in ("base", "large", "tiny"):
        raise ValueError(f"unknown CCLM-X2VLM size {size!r}; expected 'base', 'large' or 'tiny'")
    large = size == "large"
    cfg = base_model_config()
    cfg.vision = vit_vision_config("beit2", "large" if large else "base")
    width, heads, ffn, layers = (1024, 16, 4096, 24) if large else (768, 12, 3072, 12)
    cfg.text.update(hidden_size=width, num_heads=heads, intermediate_size=ffn, num_layers=layers,
                    fusion_layer=layers)
    cfg.cross = ml_collections.ConfigDict({"num_layers": 6, "num_heads": heads, "intermediate_size": ffn,
                                           "layer_norm_eps": 1e-12})
    if size == "tiny":
        cfg.vision.update(embed_dim=128, depth=2, num_heads=2)
        cfg.text.update(vocab_size=1000, hidden_size=128, num_heads=4, intermediate_size=256, num_layers=4,
                        fusion_layer=4, mask_token_id=999)
        cfg.cross.update(num_layers=2, num_heads=4, intermediate_size=256)
        cfg.embed_dim = 32
    return cfg


def reference_model_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The default config of `cfg`'s family (CCLM or CCLM-X2VLM, Swin or ViT tower): the keys `cfg` may have."""
    from cclm_jax.models.cclm import is_x2vlm, vision_kind

    reference = x2vlm_model_config() if is_x2vlm(cfg) else base_model_config()
    if vision_kind(cfg) == "vit":
        reference.vision = vit_vision_config("beit2", "base")
    return reference


def _vit_errors(v: ml_collections.ConfigDict) -> list[str]:
    from cclm_jax.models.vit import POOLS, QKV_BIASES

    errors = []
    if v.image_res % v.patch_size:
        errors.append(f"model.vision.image_res {v.image_res} must be divisible by patch_size {v.patch_size}")
    if v.embed_dim % v.num_heads:
        errors.append(f"model.vision.embed_dim {v.embed_dim} is not divisible by num_heads {v.num_heads}")
    if v.qkv_bias not in QKV_BIASES:
        errors.append(f"model.vision.qkv_bias {v.qkv_bias!r} is not one of {QKV_BIASES}")
    if v.pool not in POOLS:
        errors.append(f"model.vision.pool {v.pool!r} is not one of {POOLS}")
    if v.pos_grid < 0 or (v.pos_grid and v.pos_grid < 4 and v.pos_grid != v.image_res // v.patch_size):
        errors.append(f"model.vision.pos_grid {v.pos_grid} must be 0 (no absolute positions) or a stored grid side "
                      ">= 4 (bicubic resize needs 4 taps)")
    if v.depth < 1:
        errors.append(f"model.vision.depth must be >= 1, got {v.depth}")
    return errors


def _swin_errors(v: ml_collections.ConfigDict) -> list[str]:
    n_stages = len(v.depths)
    errors = []
    if len(v.num_heads) != n_stages:
        errors.append(f"model.vision.num_heads has {len(v.num_heads)} entries, depths has {n_stages}")
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
    return errors


def validate_model_config(cfg: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the offending field when the architecture cannot be built."""
    from cclm_jax.models.cclm import is_x2vlm, vision_kind, vision_width

    v, t = cfg.vision, cfg.text
    kind = vision_kind(cfg)
    if kind not in ("swin", "vit"):
        raise ValueError(f"invalid model config:\n  model.vision.kind {kind!r} is not 'swin' or 'vit'")
    errors = _vit_errors(v) if kind == "vit" else _swin_errors(v)
    if not errors and vision_width(cfg) != t.hidden_size:
        what = "model.vision.embed_dim" if kind == "vit" else "model.vision.embed_dim * 2^(stages-1)"
        errors.append(
            f"vision width {vision_width(cfg)} ({what}) must equal model.text.hidden_size "
            f"{t.hidden_size}: the fusion layers' cross-attention serves image tokens and sentence states alike")
    if t.hidden_size % t.num_heads:
        errors.append(f"model.text.hidden_size {t.hidden_size} is not divisible by num_heads {t.num_heads}")
    if is_x2vlm(cfg):
        c = cfg.cross
        if t.fusion_layer != t.num_layers:
            errors.append(f"model.text.fusion_layer {t.fusion_layer} must equal num_layers {t.num_layers} for "
                          "CCLM-X2VLM (its text encoder has no cross-attention; model.cross is the fusion stack)")
        if c.num_layers < 1:
            errors.append(f"model.cross.num_layers must be >= 1, got {c.num_layers}")
        if t.hidden_size % c.num_heads:
            errors.append(f"model.text.hidden_size {t.hidden_size} is not divisible by model.cross.num_heads "
                          f"{c.num_heads}")
    elif not 0 < t.fusion_layer < t.num_layers:
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
    if t.get("pool", "cls") not in ("cls", "mean"):
        errors.append(f"model.text.pool must be 'cls' or 'mean', got {t.pool!r}")
    elif t.get("pool", "cls") == "mean" and "cross" in cfg:
        errors.append("model.text.pool='mean' is a CCLM option; CCLM-X2VLM pools its text tower's CLS state")
    for switch in ("cache_cross_kv", "scan_layers"):
        if not isinstance(cfg.get(switch, False), bool):
            errors.append(f"model.{switch} must be True or False, got {cfg[switch]!r}")
    if errors:
        raise ValueError("invalid model config:\n  " + "\n  ".join(errors))
