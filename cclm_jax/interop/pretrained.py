"""Initialisation from public weights: CCLM from XLM-R-large + Swin as the reference pre-training does (spec §6.3),
CCLM-X2VLM from BEiT-v2 / DINOv2, XLM-R and BERT checkpoints (`init_towers_from_hf`, at the end of this module).

`init_from_pretrained(model_config, xlmr_dir, swin_path, rng, layer_map=None) -> (params, from_pretrained)`

- Text, from an HF XLM-R checkpoint directory (`model.safetensors` or `pytorch_model.bin`, + `config.json`,
  whose sizes must match `model_config.text`): `roberta.embeddings.*` -> our embeddings; layer
  `layer_map[i]` of `roberta.encoder.layer` -> our layer i (default 1, 3, ..., 2N-1: 1,3,...,23 -> 0..11 for
  the 12-layer stack), self-attention, FFN and their LayerNorms; `lm_head.{bias, dense, layer_norm}` -> the
  MLM head (`bias`, `transform.dense`, `transform.LayerNorm`). `lm_head.decoder.weight` is tied to the word
  embeddings: when the file has it, it must equal `roberta.embeddings.word_embeddings.weight` (and
  `lm_head.decoder.bias`, when present, `lm_head.bias`). Ignored: the pooler, the other layers, the
  `position_ids` / `token_type_ids` buffers.
- Vision, from a Microsoft Swin checkpoint (`{'model': state_dict}` `.pth`): every key maps to
  `vision_encoder.<key>`; the classifier `head.*` and the buffers (`relative_position_index`, `attn_mask`)
  are ignored (regenerated). Relative position tables are resized when the window differs
  (`relpos.resize_relative_position_table`, the reference's geometric-progression bicubic method).
- New parameters, initialised by our model's own initialisers exactly as `model.init(rng, ...)` would
  (only those leaves are computed, under jit): the fusion layers' cross-attention (BERT N(0, 0.02) weights,
  zero biases, LayerNorm 1/0), `text_proj`, `vision_proj`, `itm_head`, `bbox_head` (PyTorch-default Linear
  init) and `temp` (model_config.temp).

`from_pretrained` is a pytree of Python bools with the structure of `params`: True where the value came
from a checkpoint (the optimizer gives the others lr x2). Any key of either file that is neither mapped nor
ignorable, a missing key, a non-float parameter, a wrong shape or a config.json mismatch raises
`CheckpointError` naming the file and the first offending keys. Both files are memory-mapped and converted
tensor by tensor, so the full-size model needs one copy of its parameters in memory.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from cclm_jax.interop.files import Checkpoint, CheckpointError, check_dtypes, open_checkpoint
from cclm_jax.interop.layout import Entry, from_torch_array, get_path, official_layout, set_path
from cclm_jax.interop.official import LISTED_KEYS, arrays_equal
from cclm_jax.interop.relpos import resize_relative_position_table
from cclm_jax.interop.shapes import param_shapes
from cclm_jax.models import build_model

XLMR_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# XLM-R config.json field -> our model.text field.
XLMR_CONFIG_FIELDS = {"hidden_size": "hidden_size", "num_attention_heads": "num_heads",
                      "intermediate_size": "intermediate_size", "vocab_size": "vocab_size",
                      "max_position_embeddings": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
                      "layer_norm_eps": "layer_norm_eps"}
XLMR_TIED = (("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight"),
             ("lm_head.decoder.bias", "lm_head.bias"))
_XLMR_IGNORED = re.compile(r"^(roberta\.pooler\..*|roberta\.embeddings\.(position_ids|token_type_ids)"
                           r"|lm_head\.decoder\.(weight|bias))$")
_SWIN_IGNORED = re.compile(r"^(head\..*|.*\.relative_position_index|.*\.attn_mask)$")
_MLM_NAMES = {"bias": "lm_head.bias", "transform.dense.": "lm_head.dense.",
              "transform.LayerNorm.": "lm_head.layer_norm."}


def default_layer_map(num_layers: int) -> list[int]:
    """XLM-R layer for each of our layers: 1, 3, 5, ... (the reference's choice for 12 of 24)."""
    return [2 * i + 1 for i in range(num_layers)]


def source_key(key: str, layer_map: Sequence[int]) -> tuple[str, str] | None:
    """('xlmr' | 'swin', key in that file) for an official CCLM key, or None for a new parameter."""
    if key.startswith("vision_encoder."):
        return "swin", key[len("vision_encoder."):]
    if key.startswith("text_encoder.bert.embeddings."):
        return "xlmr", "roberta." + key[len("text_encoder.bert."):]
    m = re.match(r"text_encoder\.bert\.encoder\.layer\.(\d+)\.(.*)$", key)
    if m:
        if m.group(2).startswith("crossattention."):
            return None
        return "xlmr", f"roberta.encoder.layer.{layer_map[int(m.group(1))]}.{m.group(2)}"
    prefix = "text_encoder.cls.predictions."
    if key.startswith(prefix):
        rest = key[len(prefix):]
        for ours, theirs in _MLM_NAMES.items():
            if rest == ours or (ours.endswith(".") and rest.startswith(ours)):
                return "xlmr", theirs + rest[len(ours):]
    return None


def _xlmr_files(xlmr_dir: str) -> tuple[str, dict]:
    config_path = os.path.join(xlmr_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: the XLM-R checkpoint directory needs its config.json")
    with open(config_path) as f:
        config = json.load(f)
    for name in XLMR_WEIGHT_FILES:
        if os.path.isfile(os.path.join(xlmr_dir, name)):
            return os.path.join(xlmr_dir, name), config
    raise FileNotFoundError(f"{xlmr_dir}: none of {list(XLMR_WEIGHT_FILES)} found")


def _check_xlmr_config(config: dict, config_path: str, text: ml_collections.ConfigDict,
                       layer_map: Sequence[int]) -> None:
    problems = [f"{theirs}={config.get(theirs)!r} but model.text.{ours}={text[ours]!r}"
                for theirs, ours in XLMR_CONFIG_FIELDS.items() if config.get(theirs) != text[ours]]
    if config.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act={config['hidden_act']!r} but the model uses exact 'gelu'")
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or max(layer_map) >= layers:
        problems.append(f"num_hidden_layers={layers!r} but layer_map selects layer {max(layer_map)}")
    if problems:
        raise CheckpointError(f"{config_path}: does not match the model config: " + "; ".join(problems))


def _check_layer_map(layer_map: Sequence[int], num_layers: int) -> list[int]:
    layer_map = [int(i) for i in layer_map]
    if len(layer_map) != num_layers or len(set(layer_map)) != num_layers or min(layer_map) < 0:
        raise ValueError(f"layer_map {layer_map} must list {num_layers} distinct non-negative XLM-R layer "
                         f"indices (one per layer of model.text.num_layers={num_layers})")
    return layer_map


def _check_unused(checkpoint: Checkpoint, used: set[str], ignored) -> None:
    unexpected = [k for k in checkpoint if k not in used and not ignored(k)]
    if unexpected:
        raise CheckpointError(f"{checkpoint.path}: {len(unexpected)} unexpected key(s) (neither mapped to the "
                              f"model nor known to be unused), first: {unexpected[:LISTED_KEYS]}")


def _check_xlmr_ties(checkpoint: Checkpoint) -> None:
    for key, twin in XLMR_TIED:
        if key in checkpoint and twin in checkpoint and not arrays_equal(checkpoint[key], checkpoint[twin]):
            raise CheckpointError(f"{checkpoint.path}: {key} must equal {twin} (tied weights), but they differ")


def _read_parameter(entry: Entry, checkpoint: Checkpoint, key: str, shape: tuple[int, ...]) -> np.ndarray:
    tensor = np.asarray(checkpoint[key], np.float32)
    if entry.key.endswith(".relative_position_bias_table") and tensor.shape[0] != shape[0]:
        logging.info("%s: resizing the relative position table %s -> %d rows", key, tensor.shape, shape[0])
        tensor = resize_relative_position_table(tensor, shape[0])
    return from_torch_array(entry, tensor, shape)


def _touch_new_modules(model, width: int) -> jax.Array:
    """Call every CCLM part holding new parameters (fusion layers, projections, heads, temp) on 1-token inputs.

    Linen derives a parameter's rng from the root rng and its module path only, so `model.init` with this
    method gives those leaves the values a full `model.init` gives them, without the Swin or embeddings.
    """
    x = jnp.zeros((1, 1, width), jnp.float32)
    atts = jnp.ones((1, 1), jnp.int32)
    cls = model.fuse(x, atts, x, atts)[:, 0]
    model.features(x, x)
    model.itm_logits(cls)
    model.bbox(cls)
    return model.temperature()


def _init_new_params(model_config: ml_collections.ConfigDict, rng: jax.Array,
                     paths: list[tuple[str, ...]]) -> list[jax.Array]:
    """The leaves at `paths` of `model.init(rng, ...)['params']`, computing only those (jit drops the rest)."""
    model = build_model(model_config)

    def init(rng):
        variables = model.init(rng, model_config.text.hidden_size, method=_touch_new_modules)
        params = nn.meta.unbox(variables["params"])
        return [get_path(params, path) for path in paths]

    return jax.jit(init)(rng)


def init_from_pretrained(model_config: ml_collections.ConfigDict, xlmr_dir: str | os.PathLike,
                         swin_path: str | os.PathLike, rng: jax.Array,
                         layer_map: Sequence[int] | None = None) -> tuple[dict, dict]:
    """(params, from_pretrained): CCLM parameters from XLM-R + Swin checkpoints, the rest as `model.init`.

    `layer_map[i]`: the XLM-R layer copied into our layer i (default `default_layer_map`). `params` is a
    nested dict of float32 jax arrays; `from_pretrained` the same structure of bools (module docstring).
    """
    text = model_config.text
    layer_map = _check_layer_map(default_layer_map(text.num_layers) if layer_map is None else layer_map,
                                 text.num_layers)
    xlmr_path, xlmr_config = _xlmr_files(os.fspath(xlmr_dir))
    _check_xlmr_config(xlmr_config, os.path.join(os.fspath(xlmr_dir), "config.json"), text, layer_map)
    files = {"xlmr": open_checkpoint(xlmr_path), "swin": open_checkpoint(swin_path)}
    _check_xlmr_ties(files["xlmr"])

    shapes = param_shapes(model_config)
    loaded, new_paths, errors = {}, [], []
    used = {name: set() for name in files}
    params_entries = [e for e in official_layout(model_config, "pretrain") if e.kind != "buffer" and not e.tied_to]
    missing = {name: [] for name in files}
    for entry in params_entries:
        source = source_key(entry.key, layer_map)
        if source is None:
            new_paths.append(entry.path)
            continue
        name, key = source
        if key not in files[name]:
            missing[name].append(key)
            continue
        used[name].add(key)
        shape = get_path(shapes, entry.path)
        try:
            loaded[entry.path] = jnp.asarray(_read_parameter(entry, files[name], key, shape))
        except ValueError as e:
            errors.append(f"{files[name].path}: {key} -> {entry.key}: {e}")
    for name, keys in missing.items():
        if keys:
            raise CheckpointError(f"{files[name].path}: {len(keys)} missing key(s), first: {keys[:LISTED_KEYS]}")
    for name, checkpoint in files.items():
        check_dtypes(checkpoint, dict.fromkeys(used[name], "floating"), checkpoint.path)
    if errors:
        raise CheckpointError(f"{len(errors)} tensor(s) do not fit the model config, first: "
                              + "; ".join(errors[:LISTED_KEYS]))
    _check_unused(files["xlmr"], used["xlmr"],
                  lambda k: bool(_XLMR_IGNORED.match(k)) or _unselected_layer(k, layer_map))
    _check_unused(files["swin"], used["swin"], lambda k: bool(_SWIN_IGNORED.match(k)))

    new = dict(zip(new_paths, _init_new_params(model_config, rng, new_paths)))
    logging.info("init_from_pretrained: %d tensors from checkpoints, %d new", len(loaded), len(new))
    params, from_pretrained = {}, {}
    for path in _leaf_paths(shapes):
        if path not in loaded and path not in new:
            raise RuntimeError(f"the official layout has no entry for parameter {'/'.join(path)}")
        set_path(params, path, loaded[path] if path in loaded else new[path])
        set_path(from_pretrained, path, path in loaded)
    return params, from_pretrained


def _unselected_layer(key: str, layer_map: Sequence[int]) -> bool:
    m = re.match(r"roberta\.encoder\.layer\.(\d+)\.", key)
    return bool(m) and int(m.group(1)) not in layer_map


def _leaf_paths(tree: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, value in tree.items():
        if isinstance(value, dict):
            out += _leaf_paths(value, prefix + (name,))
        else:
            out.append(prefix + (name,))
    return out




# ------------------------------------------------------------------------------------------------------------
# Towers from HF-layout / original checkpoints (CCLM-X2VLM and ViT towers)
# ------------------------------------------------------------------------------------------------------------

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# HF Dinov2Model layer -> our (timm/BEiT) block names; the q/k/v triple is concatenated into `attn.qkv`.
_DINOV2_BLOCK = {"norm1.": "norm1.", "norm2.": "norm2.", "attention.output.dense.": "attn.proj.",
                 "layer_scale1.lambda1": "gamma_1", "layer_scale2.lambda1": "gamma_2", "mlp.fc1.": "mlp.fc1.",
                 "mlp.fc2.": "mlp.fc2."}
_VISION_IGNORED = re.compile(r"^(head\..*|.*\.relative_position_index|.*mask_token|pooler\..*|lm_head\..*"
                             r"|norm\..*|layernorm\..*|fc_norm\..*)$")
_TEXT_IGNORED = re.compile(r"^(pooler\..*|embeddings\.(position_ids|token_type_ids)|lm_head\..*|cls\..*)$")


def weights_file(path: str | os.PathLike) -> str:
    """A checkpoint file, or the weights file of an HF directory (`model.safetensors`, else `pytorch_model.bin`)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"{path}: none of {list(WEIGHT_FILES)} found")


def _strip_prefix(checkpoint: Checkpoint, marker: str) -> str:
    """The prefix (e.g. 'dinov2.', 'roberta.', 'bert.', '') before `marker` in the checkpoint's keys."""
    for key in checkpoint:
        if key.endswith(marker):
            return key[:-len(marker)]
    raise CheckpointError(f"{checkpoint.path}: no key ending in {marker!r}")


def vision_source(checkpoint: Checkpoint, key: str) -> str | tuple[str, ...] | None:
    """The file key(s) of our `vision_encoder.<key>` (timm/BEiT name) in a ViT checkpoint: the original BEiT-v2 /
    timm layout (same names) or HF `Dinov2Model` (`[dinov2.]embeddings.*`, `encoder.layer.*`, `layernorm`); a tuple
    is concatenated along axis 0 (q, k, v -> qkv). None: not in the file."""
    if "patch_embed.proj.weight" in checkpoint:
        return key if key in checkpoint else None
    pre = _strip_prefix(checkpoint, "embeddings.patch_embeddings.projection.weight")
    simple = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
              "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
              "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
              "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias",
              "fc_norm.weight": "layernorm.weight", "fc_norm.bias": "layernorm.bias"}
    if key in simple:
        return pre + simple[key]
    m = re.match(r"blocks\.(\d+)\.(.*)$", key)
    if not m:
        return None
    layer, rest = f"{pre}encoder.layer.{m.group(1)}.", m.group(2)
    if rest.startswith("attn.qkv."):
        suffix = rest[len("attn.qkv."):]
        return tuple(f"{layer}attention.attention.{p}.{suffix}" for p in ("query", "key", "value"))
    for theirs, ours in _DINOV2_BLOCK.items():
        if rest == ours or (ours.endswith(".") and rest.startswith(ours)):
            return layer + theirs + rest[len(ours):]
    return None


def text_source(checkpoint: Checkpoint, key: str, layer_map: Sequence[int] | None = None) -> str:
    """The file key of our `text_encoder.<key>` (BertModel names) in an HF `XLMRobertaModel` / `BertModel` file
    (`roberta.` / `bert.` prefixes or none); `layer_map[i]`: the file's layer for our layer i (default i)."""
    pre = _strip_prefix(checkpoint, "embeddings.word_embeddings.weight")
    m = re.match(r"encoder\.layer\.(\d+)\.(.*)$", key)
    if m and layer_map is not None:
        key = f"encoder.layer.{layer_map[int(m.group(1))]}.{m.group(2)}"
    return pre + key


def cross_source(checkpoint: Checkpoint, key: str, layer_map: Sequence[int]) -> str | None:
    """The file key of our `cross_encoder.<key>` in an HF `BertModel` file: self-attention and FFN of layer
    `layer_map[i]`; None for the cross-attention (new, or a file that has it: then taken too)."""
    pre = _strip_prefix(checkpoint, "encoder.layer.0.attention.self.query.weight")
    m = re.match(r"encoder\.layer\.(\d+)\.(.*)$", key)
    source = f"{pre}encoder.layer.{layer_map[int(m.group(1))]}.{m.group(2)}"
    return source if source in checkpoint else None


def _read_sources(entry: Entry, checkpoint: Checkpoint, source: str | tuple[str, ...],
                  shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(source, tuple):
        tensor = np.concatenate([np.asarray(checkpoint[k], np.float32) for k in source], axis=0)
        return from_torch_array(entry, tensor, shape)
    return _read_parameter(entry, checkpoint, source, shape)


def init_towers_from_hf(model_config: ml_collections.ConfigDict, rng: jax.Array, *,
                        vision: str | os.PathLike | None = None, text: str | os.PathLike | None = None,
                        cross: str | os.PathLike | None = None, text_layer_map: Sequence[int] | None = None,
                        cross_layer_map: Sequence[int] | None = None) -> tuple[dict, dict]:
    """(params, from_pretrained) of a CCLM-X2VLM model: towers from public checkpoints, the rest as `model.init`.

    - `vision`: a ViT file or HF directory: the original BEiT-v2 / timm layout (`beitv2_*.pth`, `{'model': ...}`;
      `head.*` and buffers ignored, relative position tables resized to the model's grid) or HF `Dinov2Model`
      (q/k/v concatenated into qkv, `layernorm` -> the final norm, `mask_token` ignored; the stored position grid
      must equal `model.vision.pos_grid`, the forward pass resizes it).
    - `text`: an HF `XLMRobertaModel` / `BertModel` file or directory (prefix `roberta.` / `bert.` or none): the
      embeddings and layer `text_layer_map[i]` (default i) -> text layer i; pooler and LM head ignored.
    - `cross`: an HF `BertModel` file or directory: layer `cross_layer_map[i]` (default the last
      `model.cross.num_layers` layers) -> cross layer i, self-attention and FFN; cross-attention is new unless the
      file has it.
    Every tower left out is initialised as `model.init` would. Shapes must fit the model config (CheckpointError
    naming the file and key otherwise); file keys that are neither used nor known to be unused are an error.
    """
    if "cross" not in model_config:
        raise ValueError("init_towers_from_hf builds a CCLM-X2VLM model (a config with model.cross); for CCLM use "
                         "init_from_pretrained")
    files = {name: open_checkpoint(weights_file(path))
             for name, path in (("vision", vision), ("text", text), ("cross", cross)) if path is not None}
    if cross_layer_map is None and "cross" in files:
        layers = _count_layers(files["cross"])
        cross_layer_map = list(range(layers - model_config.cross.num_layers, layers))
    shapes = param_shapes(model_config)
    loaded, used, errors = {}, {name: set() for name in files}, []
    for entry in official_layout(model_config):
        if entry.kind == "buffer" or entry.tied_to is not None:
            continue
        tower, _, rest = entry.key.partition(".")
        name = {"vision_encoder": "vision", "text_encoder": "text", "cross_encoder": "cross"}.get(tower)
        if name not in files:
            continue
        checkpoint = files[name]
        if name == "vision":
            source = vision_source(checkpoint, rest)
        elif name == "text":
            source = text_source(checkpoint, rest, text_layer_map)
        else:
            source = cross_source(checkpoint, rest, cross_layer_map)
        if source is None or any(k not in checkpoint for k in (source if isinstance(source, tuple) else (source,))):
            if name == "cross":
                continue
            errors.append(f"{checkpoint.path}: no tensor for {entry.key} (looked for {source})")
            continue
        used[name].update(source if isinstance(source, tuple) else (source,))
        try:
            loaded[entry.path] = jnp.asarray(_read_sources(entry, checkpoint, source, get_path(shapes, entry.path)))
        except ValueError as e:
            errors.append(f"{checkpoint.path}: {source} -> {entry.key}: {e}")
    if errors:
        raise CheckpointError(f"{len(errors)} tensor(s) missing or not fitting the model config, first: "
                              + "; ".join(errors[:LISTED_KEYS]))
    for name, checkpoint in files.items():
        check_dtypes(checkpoint, dict.fromkeys(used[name], "floating"), checkpoint.path)
        prefix = {"text": "embeddings.word_embeddings.weight",
                  "cross": "encoder.layer.0.attention.self.query.weight"}.get(name)
        strip = _strip_prefix(checkpoint, prefix) if prefix else ""
        selected = set(text_layer_map if name == "text" and text_layer_map else []) | set(
            cross_layer_map if name == "cross" else [])

        def ignorable(key, name=name, strip=strip, selected=selected):
            rest = key[len(strip):] if key.startswith(strip) else key
            if name == "vision":
                return bool(_VISION_IGNORED.match(rest.removeprefix("dinov2.")))
            m = re.match(r"encoder\.layer\.(\d+)\.", rest)
            return (bool(_TEXT_IGNORED.match(rest)) or (name == "cross" and rest.startswith("embeddings."))
                    or bool(m and selected and int(m.group(1)) not in selected))

        _check_unused(checkpoint, used[name], ignorable)
    new_paths = [p for p in _leaf_paths(shapes) if p not in loaded]
    new = dict(zip(new_paths, _init_all_new(model_config, rng, new_paths)))
    logging.info("init_towers_from_hf: %d tensors from checkpoints, %d new", len(loaded), len(new))
    params, from_pretrained = {}, {}
    for path in _leaf_paths(shapes):
        set_path(params, path, loaded[path] if path in loaded else new[path])
        set_path(from_pretrained, path, path in loaded)
    return params, from_pretrained


def _count_layers(checkpoint: Checkpoint) -> int:
    found = {int(m.group(1)) for k in checkpoint if (m := re.search(r"encoder\.layer\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _init_all_new(model_config: ml_collections.ConfigDict, rng: jax.Array,
                  paths: list[tuple[str, ...]]) -> list[jax.Array]:
    """The leaves at `paths` of a full `model.init(rng, ...)` (jit keeps only what they need)."""
    model = build_model(model_config)
    res = model_config.vision.image_res

    def init(rng):
        ids = jnp.zeros((1, 4), jnp.int32)
        params = nn.meta.unbox(model.init(rng, jnp.zeros((1, res, res, 3)), ids, jnp.ones_like(ids))["params"])
        return [get_path(params, path) for path in paths]

    return jax.jit(init)(rng)
