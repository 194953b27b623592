"""The CCLM architecture config for the PyTorch module: validation and inference from a state_dict.

The config is a plain dict, the same layout the JAX side writes as ``config.json``::

    {"vision": {"image_res": 224, "patch_size": 4, "embed_dim": 128, "depths": [2, 2, 18, 2],
                "num_heads": [4, 8, 16, 32], "window_size": 7, "mlp_ratio": 4.0},
     "text": {"vocab_size": 250002, "hidden_size": 1024, "num_heads": 16, "intermediate_size": 4096,
              "num_layers": 12, "fusion_layer": 6, "max_position_embeddings": 514,
              "type_vocab_size": 1, "layer_norm_eps": 1e-5},
     "embed_dim": 256}

``vision.patch_size`` is the Swin patch (stride of the first convolution, in pixels), not the official
config's ``patch_size: 32`` (the output stride).
"""
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

_VISION_INT_FIELDS = ("image_res", "patch_size", "embed_dim", "window_size")
_VISION_LIST_FIELDS = ("depths", "num_heads")
_TEXT_INT_FIELDS = ("vocab_size", "hidden_size", "num_heads", "intermediate_size", "num_layers",
                    "fusion_layer", "max_position_embeddings", "type_vocab_size")


class ConfigError(ValueError):
    """An architecture config field is absent, unknown or inconsistent."""


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config field {field!r}: expected a positive int, got {value!r}")
    return value


def _positive_float(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"config field {field!r}: expected a positive number, got {value!r}")
    return float(value)


def _section(config: Mapping, name: str, fields: tuple, optional: tuple = ()) -> Mapping:
    section = config.get(name)
    if not isinstance(section, Mapping):
        raise ConfigError(f"config field {name!r}: expected a dict, got {section!r}")
    missing = [f for f in fields if f not in section]
    unknown = sorted(set(section) - set(fields) - set(optional))
    if missing:
        raise ConfigError(f"config section {name!r} lacks field(s) {missing}")
    if unknown:
        raise ConfigError(f"config section {name!r} has unknown field(s) {unknown}; expected {list(fields)}")
    return section


def swin_stages(vision: Mapping) -> list:
    """Geometry of each Swin stage: a list of dicts with ``resolution`` (tokens per side), ``window``
    (tokens per window side, clamped to the resolution) and ``shift`` (cyclic shift of odd blocks; 0
    when the resolution does not exceed the window, as in the official Swin)."""
    stages = []
    resolution = vision["image_res"] // vision["patch_size"]
    for _ in vision["depths"]:
        if resolution <= vision["window_size"]:
            stages.append({"resolution": resolution, "window": resolution, "shift": 0})
        else:
            stages.append({"resolution": resolution, "window": vision["window_size"],
                           "shift": vision["window_size"] // 2})
        resolution //= 2
    return stages


def vision_width(vision: Mapping) -> int:
    """Channels of the Swin output tokens: embed_dim doubled by every patch merging."""
    return vision["embed_dim"] * 2 ** (len(vision["depths"]) - 1)


def validate_config(config: Mapping) -> dict:
    """Check an architecture config and return a normalised copy: a CCLM config (layout in the module docstring)
    or, when it has a ``cross`` section, a CCLM-X2VLM one (``validate_x2vlm_config``).

    Raises ConfigError naming the offending field."""
    if is_x2vlm_config(config):
        return validate_x2vlm_config(config)
    return validate_cclm_config(config)


def validate_cclm_config(config: Mapping) -> dict:
    """Check a CCLM architecture config (layout in the module docstring) and return a normalised copy."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"config: expected a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - {"vision", "text", "embed_dim"})
    if unknown:
        raise ConfigError(f"config has unknown top-level field(s) {unknown}; expected vision, text, embed_dim")
    if "embed_dim" not in config:
        raise ConfigError("config lacks the top-level field 'embed_dim' (ITC projection size)")
    v = _section(config, "vision", _VISION_INT_FIELDS + _VISION_LIST_FIELDS + ("mlp_ratio",))
    t = _section(config, "text", _TEXT_INT_FIELDS + ("layer_norm_eps",))

    vision = {f: _positive_int(v[f], f"vision.{f}") for f in _VISION_INT_FIELDS}
    for f in _VISION_LIST_FIELDS:
        if not isinstance(v[f], (list, tuple)) or not v[f]:
            raise ConfigError(f"config field 'vision.{f}': expected a non-empty list of ints, got {v[f]!r}")
        vision[f] = [_positive_int(x, f"vision.{f}[{i}]") for i, x in enumerate(v[f])]
    vision["mlp_ratio"] = _positive_float(v["mlp_ratio"], "vision.mlp_ratio")
    text = {f: _positive_int(t[f], f"text.{f}") for f in _TEXT_INT_FIELDS}
    text["layer_norm_eps"] = _positive_float(t["layer_norm_eps"], "text.layer_norm_eps")
    embed_dim = _positive_int(config["embed_dim"], "embed_dim")

    if len(vision["depths"]) != len(vision["num_heads"]):
        raise ConfigError(f"config fields 'vision.depths' {vision['depths']} and 'vision.num_heads' "
                          f"{vision['num_heads']} must have the same length (one entry per stage)")
    if vision["image_res"] % vision["patch_size"]:
        raise ConfigError(f"config field 'vision.image_res' {vision['image_res']} is not a multiple of "
                          f"'vision.patch_size' {vision['patch_size']}")
    width = vision["embed_dim"]
    for s, stage in enumerate(swin_stages(vision)):
        if stage["resolution"] % stage["window"]:
            raise ConfigError(f"Swin stage {s}: {stage['resolution']}x{stage['resolution']} tokens do not tile "
                              f"into windows of {stage['window']} (check vision.image_res / vision.window_size)")
        if s < len(vision["depths"]) - 1 and stage["resolution"] % 2:
            raise ConfigError(f"Swin stage {s}: resolution {stage['resolution']} is odd, patch merging needs "
                              f"an even one (check vision.image_res)")
        if width % vision["num_heads"][s]:
            raise ConfigError(f"Swin stage {s}: width {width} is not divisible by vision.num_heads[{s}] "
                              f"{vision['num_heads'][s]}")
        width *= 2
    if text["hidden_size"] % text["num_heads"]:
        raise ConfigError(f"config field 'text.hidden_size' {text['hidden_size']} is not divisible by "
                          f"'text.num_heads' {text['num_heads']}")
    if not 0 <= text["fusion_layer"] <= text["num_layers"]:
        raise ConfigError(f"config field 'text.fusion_layer' {text['fusion_layer']} must lie in "
                          f"[0, text.num_layers={text['num_layers']}]")
    if vision_width(vision) != text["hidden_size"]:
        raise ConfigError(f"Swin output width {vision_width(vision)} (vision.embed_dim * 2^(stages-1)) must equal "
                          f"text.hidden_size {text['hidden_size']}: the fusion layers' cross-attention takes "
                          f"image tokens and text states through the same key/value projections")
    return {"vision": vision, "text": text, "embed_dim": embed_dim}


def _shape(state_dict: Mapping, key: str, family: str = "CCLM") -> tuple:
    if key not in state_dict:
        raise ConfigError(f"state_dict has no {key!r}: not a {family} pre-training state_dict")
    return tuple(state_dict[key].shape)


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], text_num_heads: int | None = None,
                           image_res: int | None = None, layer_norm_eps: float = 1e-5) -> dict:
    """Infer the architecture config from the tensor shapes of an official CCLM or CCLM-X2VLM pre-training
    state_dict (``state_dict_family``); ConfigError in one line for anything else.

    Shapes cannot tell the number of text attention heads nor the text LayerNorm eps. CCLM:
    ``text_num_heads`` defaults to 16 (XLM-R-large); ``image_res`` is read from the shifted-window mask buffer
    ``vision_encoder.layers.0.blocks.1.attn_mask`` (num_windows, window², window²); pass it when that
    buffer is absent. CCLM-X2VLM: see ``x2vlm_config_from_state_dict``. Returns a validated config dict."""
    if state_dict_family(state_dict) == "x2vlm":
        return x2vlm_config_from_state_dict(state_dict, text_num_heads, image_res, layer_norm_eps)
    text_num_heads = text_num_heads or 16
    v, t = "vision_encoder.", "text_encoder."
    embed, _, patch, _ = _shape(state_dict, v + "patch_embed.proj.weight")
    block_re = re.compile(r"^vision_encoder\.layers\.(\d+)\.blocks\.(\d+)\.")
    blocks = {}
    for key in state_dict:
        match = block_re.match(key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    if sorted(blocks) != list(range(len(blocks))) or not blocks:
        raise ConfigError(f"state_dict Swin stages {sorted(blocks)} are not numbered 0..n-1")
    depths = [blocks[s] for s in range(len(blocks))]
    num_heads = [_shape(state_dict, f"{v}layers.{s}.blocks.0.attn.relative_position_bias_table")[1]
                 for s in range(len(depths))]
    table_rows = _shape(state_dict, v + "layers.0.blocks.0.attn.relative_position_bias_table")[0]
    window = (math.isqrt(table_rows) + 1) // 2
    if (2 * window - 1) ** 2 != table_rows:
        raise ConfigError(f"state_dict 'vision_encoder.layers.0.blocks.0.attn.relative_position_bias_table' has "
                          f"{table_rows} rows, not (2*window-1)^2 for any window")
    mlp_hidden = _shape(state_dict, v + "layers.0.blocks.0.mlp.fc1.weight")[0]
    if image_res is None:
        mask_key = v + "layers.0.blocks.1.attn_mask"
        if mask_key not in state_dict:
            raise ConfigError(f"state_dict has no {mask_key!r} to read the image size from: pass image_res")
        num_windows, mask_tokens, _ = state_dict[mask_key].shape
        image_res = math.isqrt(num_windows) * math.isqrt(mask_tokens) * patch

    vocab, hidden = _shape(state_dict, t + "bert.embeddings.word_embeddings.weight")
    layer_re = re.compile(r"^text_encoder\.bert\.encoder\.layer\.(\d+)\.")
    layers = {int(m.group(1)) for m in map(layer_re.match, state_dict) if m}
    cross = [i for i in layers if f"{t}bert.encoder.layer.{i}.crossattention.self.query.weight" in state_dict]
    config = {
        "vision": {"image_res": image_res, "patch_size": patch, "embed_dim": embed, "depths": depths,
                   "num_heads": num_heads, "window_size": window, "mlp_ratio": mlp_hidden / embed},
        "text": {"vocab_size": vocab, "hidden_size": hidden, "num_heads": text_num_heads,
                 "intermediate_size": _shape(state_dict, t + "bert.encoder.layer.0.intermediate.dense.weight")[0],
                 "num_layers": len(layers), "fusion_layer": min(cross, default=len(layers)),
                 "max_position_embeddings": _shape(state_dict, t + "bert.embeddings.position_embeddings.weight")[0],
                 "type_vocab_size": _shape(state_dict, t + "bert.embeddings.token_type_embeddings.weight")[0],
                 "layer_norm_eps": layer_norm_eps},
        "embed_dim": _shape(state_dict, "text_proj.weight")[0],
    }
    return validate_cclm_config(config)


# ------------------------------------------------------------------------------------------------ CCLM-X2VLM
VIT_FIELDS = ("kind", "image_res", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "layer_norm_eps",
              "qkv_bias", "rel_pos_bias", "pos_grid", "layer_scale_init", "pool")
CROSS_FIELDS = ("num_layers", "num_heads", "intermediate_size", "layer_norm_eps")
QKV_BIASES, POOLS = ("qv", "qkv", "none"), ("mean", "cls")
XLMR_PAD_TOKEN_ID = 1  # XLM-R's <pad>: RoBERTa position ids count from pad + 1
KNOWN_TEXT_HEADS = {1024: 16, 768: 12}  # XLM-R large / base, by width (as cclm_jax.interop.official)
X2VLM = "CCLM-X2VLM"
CROSS_LAYER_NORM_EPS = 1e-12  # X2-VLM's cross encoder is built from a BertConfig


def is_x2vlm_config(config: object) -> bool:
    """A CCLM-X2VLM architecture config: it has a ``cross`` section (the separate cross encoder)."""
    return isinstance(config, Mapping) and "cross" in config


def state_dict_family(state_dict: Mapping) -> str:
    """'x2vlm' for a CCLM-X2VLM state_dict (``cross_encoder.*`` keys), 'cclm' for a CCLM pre-training one
    (``text_encoder.bert.*``); anything else raises ConfigError in one line."""
    if any(key.startswith("cross_encoder.") for key in state_dict):
        return "x2vlm"
    if "text_encoder.bert.embeddings.word_embeddings.weight" in state_dict:
        return "cclm"
    hint = (" (it looks like a fine-tuned CCLM: retrieval / XVNLI / NLVR / VQA layouts are not supported)"
            if "text_encoder.embeddings.word_embeddings.weight" in state_dict else "")
    raise ConfigError(f"state_dict is neither a CCLM pre-training state_dict (no "
                      f"'text_encoder.bert.embeddings.word_embeddings.weight') nor a CCLM-X2VLM one (no "
                      f"'cross_encoder.*' keys){hint}; its first keys: {list(state_dict)[:3]}")


def _flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"config field {field!r}: expected true or false, got {value!r}")
    return value


def _choice(value: Any, field: str, choices: tuple) -> str:
    if value not in choices:
        raise ConfigError(f"config field {field!r}: expected one of {list(choices)}, got {value!r}")
    return value


def _non_negative(value: Any, field: str, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value < 0:
        raise ConfigError(f"config field {field!r}: expected a non-negative {kind.__name__}, got {value!r}")
    return kind(value)


def validate_x2vlm_config(config: Mapping) -> dict:
    """Check a CCLM-X2VLM architecture config and return a normalised copy. Layout (``config.json`` of
    ``cclm-jax export``)::

        {"vision": {"kind": "vit", "image_res": 224, "patch_size": 16, "embed_dim": 768, "depth": 12,
                    "num_heads": 12, "mlp_ratio": 4.0, "layer_norm_eps": 1e-6, "qkv_bias": "qv",
                    "rel_pos_bias": true, "pos_grid": 0, "layer_scale_init": 0.1, "pool": "mean"},
         "text": {... the CCLM text fields, fusion_layer = num_layers; optional pad_token_id (1) ...},
         "cross": {"num_layers": 6, "num_heads": 12, "intermediate_size": 3072, "layer_norm_eps": 1e-12},
         "embed_dim": 256}

    ``vision`` is the ViT of ``cclm_jax.torch.vit`` (BEiT-v2: qkv_bias 'qv', rel_pos_bias, layer scale, pool
    'mean'; DINOv2: qkv_bias 'qkv', pos_grid, pool 'cls'). Raises ConfigError naming the offending field."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"config: expected a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - {"vision", "text", "cross", "embed_dim"})
    if unknown:
        raise ConfigError(f"config has unknown top-level field(s) {unknown}; expected vision, text, cross, "
                          f"embed_dim")
    if "embed_dim" not in config:
        raise ConfigError("config lacks the top-level field 'embed_dim' (ITC projection size)")
    v = _section(config, "vision", VIT_FIELDS)
    t = _section(config, "text", _TEXT_INT_FIELDS + ("layer_norm_eps",), optional=("pad_token_id",))
    c = _section(config, "cross", CROSS_FIELDS)
    if v["kind"] != "vit":
        raise ConfigError(f"config field 'vision.kind': CCLM-X2VLM takes a ViT ('vit'), got {v['kind']!r}")
    vision = {"kind": "vit"}
    for f in ("image_res", "patch_size", "embed_dim", "depth", "num_heads"):
        vision[f] = _positive_int(v[f], f"vision.{f}")
    vision["mlp_ratio"] = _positive_float(v["mlp_ratio"], "vision.mlp_ratio")
    vision["layer_norm_eps"] = _positive_float(v["layer_norm_eps"], "vision.layer_norm_eps")
    vision["qkv_bias"] = _choice(v["qkv_bias"], "vision.qkv_bias", QKV_BIASES)
    vision["rel_pos_bias"] = _flag(v["rel_pos_bias"], "vision.rel_pos_bias")
    vision["pos_grid"] = _non_negative(v["pos_grid"], "vision.pos_grid", int)
    vision["layer_scale_init"] = _non_negative(v["layer_scale_init"], "vision.layer_scale_init", float)
    vision["pool"] = _choice(v["pool"], "vision.pool", POOLS)
    text = {f: _positive_int(t[f], f"text.{f}") for f in _TEXT_INT_FIELDS}
    text["layer_norm_eps"] = _positive_float(t["layer_norm_eps"], "text.layer_norm_eps")
    text["pad_token_id"] = _non_negative(t.get("pad_token_id", XLMR_PAD_TOKEN_ID), "text.pad_token_id", int)
    cross = {f: _positive_int(c[f], f"cross.{f}") for f in CROSS_FIELDS[:3]}
    cross["layer_norm_eps"] = _positive_float(c["layer_norm_eps"], "cross.layer_norm_eps")
    embed_dim = _positive_int(config["embed_dim"], "embed_dim")

    if vision["image_res"] % vision["patch_size"]:
        raise ConfigError(f"config field 'vision.image_res' {vision['image_res']} is not a multiple of "
                          f"'vision.patch_size' {vision['patch_size']}")
    if vision["embed_dim"] % vision["num_heads"]:
        raise ConfigError(f"config field 'vision.embed_dim' {vision['embed_dim']} is not divisible by "
                          f"'vision.num_heads' {vision['num_heads']}")
    for name, heads in (("text.num_heads", text["num_heads"]), ("cross.num_heads", cross["num_heads"])):
        if text["hidden_size"] % heads:
            raise ConfigError(f"config field 'text.hidden_size' {text['hidden_size']} is not divisible by "
                              f"{name!r} {heads}")
    if text["fusion_layer"] != text["num_layers"]:
        raise ConfigError(f"config field 'text.fusion_layer' {text['fusion_layer']} must equal text.num_layers "
                          f"{text['num_layers']}: the CCLM-X2VLM text encoder has no cross-attention")
    if text["max_position_embeddings"] <= text["pad_token_id"] + 1:
        raise ConfigError(f"config field 'text.max_position_embeddings' {text['max_position_embeddings']} leaves "
                          f"no position after text.pad_token_id {text['pad_token_id']} + 1 (RoBERTa positions)")
    if vision["embed_dim"] != text["hidden_size"]:
        raise ConfigError(f"ViT width 'vision.embed_dim' {vision['embed_dim']} must equal text.hidden_size "
                          f"{text['hidden_size']}: the cross encoder's key/value projections take image tokens and "
                          f"sentence states alike")
    return {"vision": vision, "text": text, "cross": cross, "embed_dim": embed_dim}


def _count(pattern: str, keys) -> int:
    found = {int(m.group(1)) for m in map(re.compile(pattern).match, keys) if m}
    if sorted(found) != list(range(len(found))):
        raise ConfigError(f"state_dict blocks matching {pattern!r} are numbered {sorted(found)}, not 0..n-1")
    return len(found)


def x2vlm_config_from_state_dict(state_dict: Mapping[str, torch.Tensor], text_num_heads: int | None = None,
                                 image_res: int | None = None, layer_norm_eps: float = 1e-5) -> dict:
    """Infer the CCLM-X2VLM architecture from an official X2-VLM ``CrossViewLM`` state_dict (as
    ``cclm_jax.interop.official`` does): ViT variant from which keys exist, sizes from shapes, vision heads
    from the relative position table. Shapes cannot tell the text heads: ``text_num_heads`` (default 16 for
    width 1024, 12 for 768, else width / 32); the cross encoder gets as many, and LayerNorm eps 1e-12 (a
    BertConfig). ``image_res``: default the relative-position grid (or the stored ``pos_embed`` grid, else 224)
    times the patch size."""
    v, keys = "vision_encoder.", list(state_dict)

    def shape(key: str) -> tuple:
        return _shape(state_dict, key, X2VLM)

    width, _, patch, _ = shape(v + "patch_embed.proj.weight")
    block = v + "blocks.0."
    rel_pos_bias = block + "attn.relative_position_bias_table" in state_dict
    pos_grid = math.isqrt(shape(v + "pos_embed")[1] - 1) if v + "pos_embed" in state_dict else 0
    if rel_pos_bias:
        rows, heads = shape(block + "attn.relative_position_bias_table")
        grid = (math.isqrt(rows - 3) + 1) // 2
        if (2 * grid - 1) ** 2 + 3 != rows:
            raise ConfigError(f"state_dict {block + 'attn.relative_position_bias_table'!r} has {rows} rows, not "
                              f"(2*grid-1)^2 + 3 for any grid")
    else:
        heads, grid = max(1, width // 64), pos_grid or 224 // patch
    vision = {"kind": "vit", "image_res": image_res or grid * patch, "patch_size": patch, "embed_dim": width,
              "depth": _count(r"^vision_encoder\.blocks\.(\d+)\.", keys), "num_heads": heads,
              "mlp_ratio": shape(block + "mlp.fc1.weight")[0] / width, "layer_norm_eps": 1e-6,
              "qkv_bias": ("qv" if block + "attn.q_bias" in state_dict
                           else "qkv" if block + "attn.qkv.bias" in state_dict else "none"),
              "rel_pos_bias": rel_pos_bias, "pos_grid": pos_grid,
              "layer_scale_init": 0.1 if block + "gamma_1" in state_dict else 0.0,
              "pool": "mean" if v + "fc_norm.weight" in state_dict else "cls"}
    t = "text_encoder."
    vocab, hidden = shape(t + "embeddings.word_embeddings.weight")
    heads = text_num_heads or KNOWN_TEXT_HEADS.get(hidden, max(1, hidden // 32))
    layers = _count(r"^text_encoder\.encoder\.layer\.(\d+)\.", keys)
    config = {
        "vision": vision,
        "text": {"vocab_size": vocab, "hidden_size": hidden, "num_heads": heads,
                 "intermediate_size": shape(t + "encoder.layer.0.intermediate.dense.weight")[0],
                 "num_layers": layers, "fusion_layer": layers,
                 "max_position_embeddings": shape(t + "embeddings.position_embeddings.weight")[0],
                 "type_vocab_size": shape(t + "embeddings.token_type_embeddings.weight")[0],
                 "layer_norm_eps": layer_norm_eps, "pad_token_id": XLMR_PAD_TOKEN_ID},
        "cross": {"num_layers": _count(r"^cross_encoder\.encoder\.layer\.(\d+)\.", keys), "num_heads": heads,
                  "intermediate_size": shape("cross_encoder.encoder.layer.0.intermediate.dense.weight")[0],
                  "layer_norm_eps": CROSS_LAYER_NORM_EPS},
        "embed_dim": shape("text_proj.weight")[0],
    }
    return validate_x2vlm_config(config)
