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


def _section(config: Mapping, name: str, fields: tuple) -> Mapping:
    section = config.get(name)
    if not isinstance(section, Mapping):
        raise ConfigError(f"config field {name!r}: expected a dict, got {section!r}")
    missing = [f for f in fields if f not in section]
    unknown = sorted(set(section) - set(fields))
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
    """Check an architecture config (layout in the module docstring) and return a normalised copy.

    Raises ConfigError naming the offending field."""
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


def _shape(state_dict: Mapping, key: str) -> tuple:
    if key not in state_dict:
        raise ConfigError(f"state_dict has no {key!r}: not a CCLM pre-training state_dict")
    return tuple(state_dict[key].shape)


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], text_num_heads: int = 16,
                           image_res: int | None = None, layer_norm_eps: float = 1e-5) -> dict:
    """Infer the architecture config from the tensor shapes of an official CCLM state_dict.

    Shapes cannot tell the number of text attention heads (``text_num_heads``: 16 for XLM-R-large) nor
    the text LayerNorm eps. ``image_res`` is read from the shifted-window mask buffer
    ``vision_encoder.layers.0.blocks.1.attn_mask`` (num_windows, window², window²); pass it when that
    buffer is absent. Returns a validated config dict."""
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
    return validate_config(config)
