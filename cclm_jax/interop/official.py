"""Import and export of official CCLM PyTorch checkpoints (`{'model': state_dict, 'config': ...}` `.th`).

`load(path, text_num_heads=None, **overrides) -> (model_config, params)` infers the architecture from the
tensor shapes and key counts (depths, widths, vocabulary, window, image size, fusion layer), takes what
shapes cannot tell (the text attention heads) from the file's `config['architecture']` (written by `save`) or
a `config.json` beside a `.safetensors` file, else from `text_num_heads` (a different given value is an
error), else from the known XLM-R widths, and maps every tensor onto our Flax parameter tree. Every layout of
`layout.LAYOUTS` is recognised (`detect_layout`): `pretrain` (CrossViewLM), `retrieval` (RetrievalModel, no
MLM/bbox heads: those parameters are absent), and the fine-tuning models `xvnli`, `nlvr` (NLVR2/MaRVL) and
`vqa` (xGQA), whose parameters are the trees of `models.tasks` (see `layout` for the key tables). The returned
`model_config` is always the pre-trained CCLM config the task models take (for `nlvr`: N = F + (layers - F) / 2);
layouts without projections take `embed_dim` and `temp` from the file's config when it has them (`save` writes both,
the official yaml has `temp` and `embed_dim`), else the defaults.

Geometry conversion: `load(path, vision__image_res=384, vision__window_size=12)` reads a 224-px / window-7
checkpoint into a 384-px / window-12 model the way the reference's `load_pretrained` does: relative
position tables resized (`relpos.resize_relative_position_table`), buffers checked against the file's own
geometry and dropped (`save` regenerates them for the new one). Buffers are optional, but when present they
must equal the ones the file's inferred architecture implies.

`save(path, model_config, params)` writes the official key set, order, shapes and dtypes, buffers included
and the tied MLM decoder under both names sharing one storage (as the official file). Its `config` holds
`architecture` (the `export.architecture_dict` layout, also the safetensors `config.json`), `cclm_jax_model`
(our full model config), `embed_dim`, `temp`, `image_res`, plus `extra_config`. The official code never
reads a checkpoint's config, so these keys do not disturb it.

Memory: files are memory-mapped (`files.open_checkpoint`) and converted tensor by tensor, so `load` holds one
copy of the parameters; `save` holds the parameters plus transposed copies of the Linear/conv weights
(torch.save needs the whole dict; tensors already in the official layout are shared, not copied).
Tensors with bad shapes, missing / unexpected keys, non-float parameters or float index buffers
(`files.check_dtypes`) and differing tied copies raise `CheckpointError` naming the first offending keys.
Needs the `torch` extra.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch

from cclm_jax.interop.export import architecture_dict, check_params
from cclm_jax.interop.files import CheckpointError, check_dtypes, dtype_kind, open_checkpoint
from cclm_jax.interop.layout import Entry, from_torch_array, get_path, official_layout, set_path, to_torch_array
from cclm_jax.interop.relpos import resize_relative_position_table
from cclm_jax.interop.shapes import param_shapes
from cclm_jax.models.config import base_model_config, validate_model_config
from cclm_jax.models.tasks import NLVR_CLASSES, XVNLI_CLASSES

__all__ = ["CheckpointError", "detect_layout", "infer_model_config", "is_x2vlm_state_dict", "load",
           "params_from_state_dict", "read_state_dict", "save", "state_dict_from_params"]

# Attention heads by text width for the checkpoints CCLM is built from (XLM-R large / base).
KNOWN_TEXT_HEADS = {1024: 16, 768: 12}
# Layout of a checkpoint with a `cls_head`, by its number of classes (XVNLI: 3 labels, NLVR: true/false).
CLASSIFIER_LAYOUTS = {XVNLI_CLASSES: "xvnli", NLVR_CLASSES: "nlvr"}
LISTED_KEYS = 5  # offending keys named per kind of problem
_COMPARE_CHUNK_ROWS = 16384


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `.th`/`.pth`/`.bin` (`{'model': state_dict}` or bare) or `.safetensors` file as numpy arrays.

    The arrays are views of the memory-mapped file: pages are read when a tensor is first used.
    """
    return dict(open_checkpoint(path))


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """The official layout (`layout.LAYOUTS`) of a state_dict, from its keys and the classifier's width.

    `text_encoder.bert.*`: pretrain; `text_decoder.*`: vqa; a `cls_head` with 3 outputs: xvnli, with 2: nlvr;
    otherwise a plain `text_encoder.*`: retrieval (a missing ITM head is then reported as missing keys).
    """
    if "text_encoder.bert.embeddings.word_embeddings.weight" in state_dict or is_x2vlm_state_dict(state_dict):
        return "pretrain"
    if "text_encoder.embeddings.word_embeddings.weight" not in state_dict:
        raise CheckpointError("no text_encoder word embeddings found (looked for "
                              "'text_encoder.bert.embeddings.word_embeddings.weight' and "
                              "'text_encoder.embeddings.word_embeddings.weight'): not a CCLM checkpoint")
    if any(key.startswith("text_decoder.") for key in state_dict):
        return "vqa"
    if "cls_head.3.weight" in state_dict:
        classes = int(_shape(state_dict, "cls_head.3.weight")[0])
        if classes not in CLASSIFIER_LAYOUTS:
            raise CheckpointError(f"cls_head.3.weight has {classes} outputs: expected 3 (XVNLI) or 2 (NLVR/MaRVL)")
        return CLASSIFIER_LAYOUTS[classes]
    return "retrieval"


def _count(pattern: str, keys) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _shape(state_dict: Mapping, key: str) -> tuple[int, ...]:
    shape = getattr(state_dict, "shape", None)
    return shape(key) if callable(shape) else tuple(state_dict[key].shape)


def is_x2vlm_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """A CCLM-X2VLM (X2-VLM `CrossViewLM`) state_dict: it has a separate `cross_encoder`."""
    return any(key.startswith("cross_encoder.") for key in state_dict)


def _infer_vit(sd: Mapping, keys: list[str], recorded: Mapping,
               pre: str = "vision_encoder") -> ml_collections.ConfigDict:
    """`model.vision` of a ViT state_dict under `pre` (`layout.vit_entries` names): variant fields from which keys
    exist, sizes from shapes; the heads from the relative position table, else `recorded` (the file's
    architecture), else width / 64."""
    patch = _shape(sd, f"{pre}.patch_embed.proj.weight")
    width, patch_size = int(patch[0]), int(patch[2])
    block = f"{pre}.blocks.0"
    v = ml_collections.ConfigDict({"kind": "vit", "patch_size": patch_size, "embed_dim": width,
                                   "depth": _count(rf"{re.escape(pre)}\.blocks\.(\d+)\.", keys),
                                   "mlp_ratio": _shape(sd, f"{block}.mlp.fc1.weight")[0] / width,
                                   "layer_norm_eps": 1e-6, "drop_path_rate": 0.1, "frozen": False})
    v.rel_pos_bias = f"{block}.attn.relative_position_bias_table" in sd
    v.qkv_bias = ("qv" if f"{block}.attn.q_bias" in sd else "qkv" if f"{block}.attn.qkv.bias" in sd else "none")
    v.layer_scale_init = 0.1 if f"{block}.gamma_1" in sd else 0.0
    v.pool = "mean" if f"{pre}.fc_norm.weight" in sd else "cls"
    v.pos_grid = (math.isqrt(_shape(sd, f"{pre}.pos_embed")[1] - 1) if f"{pre}.pos_embed" in sd else 0)
    if v.rel_pos_bias:
        rows, heads = _shape(sd, f"{block}.attn.relative_position_bias_table")
        v.num_heads = int(heads)
        grid = (math.isqrt(int(rows) - 3) + 1) // 2
    else:
        v.num_heads = int(recorded.get("num_heads", max(1, width // 64)))
        grid = v.pos_grid or 224 // patch_size
    v.image_res = int(recorded.get("image_res", grid * patch_size))
    return v


def _infer_x2vlm(sd: Mapping, keys: list[str], text_num_heads: int | None,
                 file_config: Mapping | None) -> ml_collections.ConfigDict:
    """The CCLM-X2VLM config of an X2-VLM `CrossViewLM` state_dict (`layout.x2vlm_layout`)."""
    recorded = _recorded_architecture(file_config)
    cfg = base_model_config()
    cfg.vision = _infer_vit(sd, keys, recorded.get("vision", {}))
    t = cfg.text
    t.vocab_size, t.hidden_size = (int(d) for d in _shape(sd, "text_encoder.embeddings.word_embeddings.weight"))
    t.max_position_embeddings = int(_shape(sd, "text_encoder.embeddings.position_embeddings.weight")[0])
    t.type_vocab_size = int(_shape(sd, "text_encoder.embeddings.token_type_embeddings.weight")[0])
    t.intermediate_size = int(_shape(sd, "text_encoder.encoder.layer.0.intermediate.dense.weight")[0])
    t.num_layers = t.fusion_layer = _count(r"text_encoder\.encoder\.layer\.(\d+)\.", keys)
    t.mask_token_id = t.vocab_size - 1
    t.num_heads = int(text_num_heads or KNOWN_TEXT_HEADS.get(t.hidden_size, max(1, t.hidden_size // 32)))
    cross_recorded = recorded.get("cross", {})
    cfg.cross = ml_collections.ConfigDict({
        "num_layers": _count(r"cross_encoder\.encoder\.layer\.(\d+)\.", keys),
        "num_heads": int(cross_recorded.get("num_heads", t.num_heads)),
        "intermediate_size": int(_shape(sd, "cross_encoder.encoder.layer.0.intermediate.dense.weight")[0]),
        "layer_norm_eps": float(cross_recorded.get("layer_norm_eps", 1e-12))})
    cfg.embed_dim = int(_shape(sd, "text_proj.weight")[0])
    cfg.temp = float(sd["temp"])
    return cfg


def infer_model_config(state_dict: Mapping[str, np.ndarray], text_num_heads: int | None = None,
                       file_config: Mapping | None = None, **overrides) -> ml_collections.ConfigDict:
    """The pre-trained CCLM `model` config of a state_dict of any layout: everything from shapes, text heads
    from the argument, `embed_dim` / `temp` from `file_config` (the file's `config`) where no tensor holds them.
    A CCLM-X2VLM state_dict (`is_x2vlm_state_dict`) gives a CCLM-X2VLM config (`models.x2vlm_model_config`)."""
    sd, keys = state_dict, list(state_dict)
    if is_x2vlm_state_dict(sd):
        try:
            cfg = _infer_x2vlm(sd, keys, text_num_heads, file_config)
        except KeyError as e:
            raise CheckpointError(f"cannot infer the CCLM-X2VLM architecture: missing key {e.args[0]!r}") from e
        _apply_overrides(cfg, overrides)
        validate_model_config(cfg)
        return cfg
    layout = detect_layout(sd)
    bert = "text_encoder.bert" if layout == "pretrain" else "text_encoder"
    cfg = base_model_config()
    v, t = cfg.vision, cfg.text
    try:
        patch = _shape(sd, "vision_encoder.patch_embed.proj.weight")
        v.embed_dim, v.patch_size = int(patch[0]), int(patch[2])
        n_stages = _count(r"vision_encoder\.layers\.(\d+)\.", keys)
        v.depths = tuple(_count(rf"vision_encoder\.layers\.{s}\.blocks\.(\d+)\.", keys) for s in range(n_stages))
        tables = [_shape(sd, f"vision_encoder.layers.{s}.blocks.0.attn.relative_position_bias_table")
                  for s in range(n_stages)]
        v.num_heads = tuple(int(tb[1]) for tb in tables)
        v.window_size = (int(round(math.sqrt(tables[0][0]))) + 1) // 2
        v.mlp_ratio = _shape(sd, "vision_encoder.layers.0.blocks.0.mlp.fc1.weight")[0] / v.embed_dim
        v.image_res = _image_res(sd, v.window_size, v.patch_size)
        t.vocab_size, t.hidden_size = (int(d) for d in _shape(sd, f"{bert}.embeddings.word_embeddings.weight"))
        t.max_position_embeddings = int(_shape(sd, f"{bert}.embeddings.position_embeddings.weight")[0])
        t.type_vocab_size = int(_shape(sd, f"{bert}.embeddings.token_type_embeddings.weight")[0])
        t.intermediate_size = int(_shape(sd, f"{bert}.encoder.layer.0.intermediate.dense.weight")[0])
        layers = _count(rf"{re.escape(bert)}\.encoder\.layer\.(\d+)\.", keys)
        cross = [i for i in range(layers) if f"{bert}.encoder.layer.{i}.crossattention.self.query.weight" in sd]
        t.fusion_layer = cross[0] if cross else layers
        t.num_layers = _pretrained_layers(layout, layers, t.fusion_layer)
        t.mask_token_id = t.vocab_size - 1
        if "text_proj.weight" in sd:
            cfg.embed_dim = int(_shape(sd, "text_proj.weight")[0])
        elif (embed_dim := _file_number(file_config, "embed_dim")) is not None:
            cfg.embed_dim = int(embed_dim)
        if "temp" in sd:
            cfg.temp = float(sd["temp"])
        elif (temp := _file_number(file_config, "temp")) is not None:
            cfg.temp = float(temp)
    except KeyError as e:
        raise CheckpointError(f"cannot infer the architecture: missing key {e.args[0]!r}") from e
    if not text_num_heads:
        text_num_heads = KNOWN_TEXT_HEADS.get(t.hidden_size, max(1, t.hidden_size // 32))
        logging.info("text attention heads not given; using %d for hidden size %d", text_num_heads,
                     t.hidden_size)
    t.num_heads = int(text_num_heads)
    _apply_overrides(cfg, overrides)
    validate_model_config(cfg)
    return cfg


def _pretrained_layers(layout: str, layers: int, fusion_layer: int) -> int:
    """N of the pre-trained stack: the NLVR stack holds F text layers and every fusion layer twice."""
    if layout != "nlvr":
        return layers
    if (layers - fusion_layer) % 2:
        raise CheckpointError(f"an NLVR text_encoder holds every fusion layer twice; found {layers} layers with "
                              f"cross-attention from layer {fusion_layer} ({layers - fusion_layer} fusion layers)")
    return fusion_layer + (layers - fusion_layer) // 2


def _image_res(sd: Mapping[str, np.ndarray], window: int, patch: int) -> int:
    """Image size from the first shifted block's attention mask (nW windows of window^2 tokens)."""
    key = "vision_encoder.layers.0.blocks.1.attn_mask"
    if key in sd:
        return int(round(math.sqrt(_shape(sd, key)[0]))) * window * patch
    # Buffers stripped: the official pairing of window and resolution (7 -> 224, 12 -> 384, 15 -> 480).
    return {7: 224, 12: 384, 15: 480}.get(window, window * 32)


def _apply_overrides(cfg: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Overrides as dotted names with '__' for '.', e.g. vision__image_res=384, or top-level fields."""
    for name, value in overrides.items():
        node, parts = cfg, name.split("__")
        for part in parts[:-1]:
            node = node[part]
        if parts[-1] not in node:
            raise KeyError(f"unknown model config override {name!r}")
        node[parts[-1]] = value


def _geometry(model_config: ml_collections.ConfigDict) -> tuple[int, int]:
    return model_config.vision.image_res, model_config.vision.get("window_size", 0)


def _resize_table(tensor: np.ndarray, rows: int, model_config: ml_collections.ConfigDict) -> np.ndarray:
    """A relative position table resized to `rows`: Swin tables whole, BEiT tables without their 3 CLS rows
    (kept as they are)."""
    if model_config.vision.get("kind", "swin") != "vit":
        return resize_relative_position_table(tensor, rows)
    return np.concatenate([resize_relative_position_table(tensor[:-3], rows - 3), tensor[-3:]])


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], model_config: ml_collections.ConfigDict,
                           layout: str | None = None,
                           source_config: ml_collections.ConfigDict | None = None) -> dict:
    """Map an official state_dict onto a nested dict of float32 numpy parameters of `model_config`.

    `source_config`: the architecture the file was written for (default `model_config`); when its
    image_res/window differ, the file's keys are checked against its own layout, its buffers are dropped
    and the relative position tables resized to `model_config`'s windows.
    """
    return _convert(state_dict, model_config, layout, source_config, place=lambda value: np.array(value, order="C"))


def _convert(state_dict: Mapping[str, np.ndarray], model_config: ml_collections.ConfigDict, layout: str | None,
             source_config: ml_collections.ConfigDict | None, place: Callable[[np.ndarray], Any]) -> dict:
    """Check keys, buffers and tied copies, then convert parameter by parameter, `place`-ing each one."""
    layout = layout or detect_layout(state_dict)
    source_config = source_config or model_config
    _check_entries(state_dict, official_layout(source_config, layout))
    resize = _geometry(source_config) != _geometry(model_config)
    shapes = param_shapes(model_config, layout)
    params: dict = {}
    errors = []
    for entry in official_layout(model_config, layout):
        if entry.kind == "buffer" or entry.tied_to is not None:
            continue
        shape = get_path(shapes, entry.path)
        try:
            tensor = np.asarray(state_dict[entry.key], np.float32)
            if resize and entry.key.endswith(".relative_position_bias_table"):
                tensor = _resize_table(tensor, shape[0], model_config)
            value = from_torch_array(entry, tensor, shape)
        except ValueError as e:
            errors.append(str(e) if str(e).startswith(entry.key) else f"{entry.key}: {e}")
            continue
        set_path(params, entry.path, place(value))
    if errors:
        raise CheckpointError(f"{len(errors)} tensor(s) do not fit the architecture, first: "
                              + "; ".join(errors[:LISTED_KEYS]))
    return params


def _check_entries(state_dict: Mapping[str, np.ndarray], entries: list[Entry]) -> None:
    """Key set (buffers and tied copies optional), dtypes (`files.check_dtypes`: floating parameters, buffers of
    their official kind), then buffers and tied copies by value."""
    expected = {e.key for e in entries}
    unknown = [k for k in state_dict if k not in expected]
    missing = [e.key for e in entries if e.kind != "buffer" and e.tied_to is None and e.key not in state_dict]
    if unknown or missing:
        raise CheckpointError(_key_report(unknown, missing))
    check_dtypes(state_dict, {e.key: dtype_kind(e.make().dtype.name) if e.kind == "buffer" else "floating"
                              for e in entries if e.key in state_dict})
    stale, untied = [], []
    for entry in entries:
        if entry.key not in state_dict:
            continue
        if entry.kind == "buffer":
            if not arrays_equal(state_dict[entry.key], entry.make()):
                stale.append(entry.key)
        elif entry.tied_to is not None and not arrays_equal(state_dict[entry.key], state_dict[entry.tied_to]):
            untied.append(f"{entry.key} != {entry.tied_to}")
    if untied:
        raise CheckpointError(f"tied weights differ: {untied}")
    if stale:
        raise CheckpointError(f"{len(stale)} buffer(s) differ from the ones the inferred architecture implies "
                              f"(image_res / window_size), first: {stale[:LISTED_KEYS]}")


def arrays_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same shape and values, compared in row blocks (no full-size temporary for 1 GB embeddings)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.ndim == 0:
        return bool(a == b)
    return all(np.array_equal(a[i:i + _COMPARE_CHUNK_ROWS], b[i:i + _COMPARE_CHUNK_ROWS])
               for i in range(0, a.shape[0], _COMPARE_CHUNK_ROWS))


def _key_report(unknown: list[str], missing: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s), first: {missing[:LISTED_KEYS]}")
    if unknown:
        parts.append(f"{len(unknown)} unexpected key(s), first: {unknown[:LISTED_KEYS]}")
    return "checkpoint does not match the architecture: " + "; ".join(parts)




def _file_config(path: str, config: Any) -> Mapping | None:
    """The config stored with the file: the `config` of a .th, `{'architecture': config.json}` beside a
    .safetensors file (None when absent)."""
    if path.endswith(".safetensors"):
        config_path = os.path.join(os.path.dirname(path), "config.json")
        if not os.path.isfile(config_path):
            return None
        with open(config_path) as f:
            return {"architecture": json.load(f)}
    return config if isinstance(config, Mapping) else None


def _file_number(file_config: Mapping | None, name: str) -> float | None:
    """A number the file's config records under `name` (top level, else in its `architecture`), or None."""
    for source in (file_config, _recorded_architecture(file_config)):
        value = source.get(name) if isinstance(source, Mapping) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    return None


def _recorded_architecture(file_config: Mapping | None) -> Mapping:
    """`file_config['architecture']` (the `export.architecture_dict` layout `save` writes), else {}."""
    if isinstance(file_config, Mapping) and isinstance(file_config.get("architecture"), Mapping):
        return file_config["architecture"]
    return {}


def load(path: str | os.PathLike, text_num_heads: int | None = None, **overrides):
    """Read an official CCLM checkpoint -> (model_config, params as a nested dict of jax arrays).

    The params are the tree of the file's layout's model (`detect_layout`; `layout.LAYOUT_TASKS`), the
    model_config the pre-trained CCLM config that model takes.

    `text_num_heads`: attention heads of the text stack (shapes cannot tell; 16 for XLM-R-large), for files
    that record none; None or 0 = not given. What the file records (see the module docstring) always wins: a
    given value that differs from it raises CheckpointError. Neither: 16 for width 1024, 12 for 768.
    `overrides`: model config fields, nested with '__' (e.g. `dtype='bfloat16'`); changing
    `vision__image_res` / `vision__window_size` converts the geometry (module docstring).
    """
    path = os.fspath(path)
    checkpoint = open_checkpoint(path)
    file_config = _file_config(path, checkpoint.config)
    recorded = _recorded_architecture(file_config).get("text", {}).get("num_heads")
    if recorded is not None:
        if text_num_heads and int(text_num_heads) != int(recorded):
            raise CheckpointError(f"{path} records {int(recorded)} text attention heads, but text_num_heads="
                                  f"{int(text_num_heads)} was given (config.init.text_num_heads / --text_num_heads): "
                                  "leave it unset (0) to use the file's value")
        text_num_heads = int(recorded)
    try:
        source_config = infer_model_config(checkpoint, text_num_heads, file_config)
        model_config = infer_model_config(checkpoint, text_num_heads, file_config, **overrides)
        # jnp.asarray copies; jax.device_put could alias a 64-byte-aligned view of the memory-mapped file,
        # which would crash (SIGBUS) once the file is overwritten, e.g. by saving to the same path.
        params = _convert(checkpoint, model_config, None, source_config, place=jnp.asarray)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return model_config, params


def state_dict_from_params(model_config: ml_collections.ConfigDict, params: Mapping,
                           layout: str = "pretrain") -> dict[str, torch.Tensor]:
    """Our parameters (the tree of `layout`'s model) -> the official state_dict (ordered; float32 weights,
    int64/float32 buffers)."""
    return _state_dict(model_config, params, layout, share_memory=False)


def _state_dict(model_config: ml_collections.ConfigDict, params: Mapping, layout: str,
                share_memory: bool) -> dict[str, torch.Tensor]:
    """`share_memory`: tensors whose official layout is our own (embeddings, norms, biases) view the float32
    parameters instead of copying them: read-only use only (torch.save), never handed to callers.
    Raises ValueError naming the first parameters `layout` needs that `params` lacks or shapes differently."""
    check_params(params, model_config, layout)
    out: dict[str, torch.Tensor] = {}
    for entry in official_layout(model_config, layout):
        if entry.tied_to is not None:
            out[entry.key] = out[entry.tied_to]  # the same tensor under both names, as the official file
        elif entry.kind == "buffer":
            out[entry.key] = torch.from_numpy(np.array(entry.make(), order="C"))
        else:
            value = to_torch_array(entry, np.asarray(jax.device_get(get_path(params, entry.path)), np.float32))
            if share_memory and value.flags.c_contiguous:
                with warnings.catch_warnings():  # a read-only view of a jax buffer: torch.save only reads it
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    out[entry.key] = torch.from_numpy(value)
            else:
                out[entry.key] = torch.from_numpy(np.array(value, order="C"))
    return out


def save(path: str | os.PathLike, model_config: ml_collections.ConfigDict, params: Mapping,
         layout: str = "pretrain", extra_config: Mapping | None = None) -> None:
    """Write `{'model': state_dict, 'config': dict}` loadable by the official code with no key mismatch.

    The file is written to `path + '.partial'` and renamed when complete: a failed or killed save leaves an
    older file at `path` intact (and removes its partial file when it fails with an exception)."""
    config = {"cclm_jax_model": model_config.to_dict(), "architecture": architecture_dict(model_config),
              **(dict(extra_config) if extra_config else {})}
    config.setdefault("embed_dim", model_config.embed_dim)
    config.setdefault("temp", model_config.temp)
    config.setdefault("image_res", model_config.vision.image_res)
    path = os.fspath(path)
    partial = path + ".partial"
    try:
        torch.save({"model": _state_dict(model_config, params, layout, share_memory=True), "config": config},
                   partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
