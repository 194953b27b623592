"""Export to safetensors: `model.safetensors` + `config.json`, what `cclm_jax.torch.load(dir)` reads.

`export_safetensors(out_dir, model_config, params, dtype="float32", layout="pretrain")` writes
- `model.safetensors`: every key of the official state_dict (`layout.official_layout`), official names and
  tensor layouts, buffers included in their official dtypes (int64 index tables and position ids, float32
  shift masks). The tied pairs are stored as two separate, identical copies under both names
  (`text_encoder.bert.embeddings.word_embeddings.weight` = `text_encoder.cls.predictions.decoder.weight`,
  `text_encoder.cls.predictions.bias` = `text_encoder.cls.predictions.decoder.bias`): safetensors has no
  shared storage, and the PyTorch module expects both names. Parameters are cast to `dtype` ('float32'
  (default, also for bfloat16 parameters), 'bfloat16' or 'float16'). Header metadata: `format: pt`,
  `cclm_jax_layout: <layout>`, `dtype: <dtype>`.
- `config.json`: `architecture_dict(model_config)` (layout below; lists, not tuples).

The file is written tensor by tensor (header first, from the shapes alone), so the export holds the
parameters plus one converted tensor, never a second full copy (the `safetensors` library's `save_file`
serialises everything into memory first). It is written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import ml_collections
import ml_dtypes
import numpy as np

from cclm_jax.interop.layout import get_path, official_layout, to_torch_array, torch_shape
from cclm_jax.interop.shapes import param_shapes

SAFETENSORS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}
VIT_FIELDS = ("kind", "image_res", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "layer_norm_eps",
              "qkv_bias", "rel_pos_bias", "pos_grid", "layer_scale_init", "pool")
_SAFETENSORS_DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64",
                            "int32": "I32", "float64": "F64"}


def architecture_dict(model_config: ml_collections.ConfigDict) -> dict:
    """The architecture as plain JSON: {"vision": {...}, "text": {...}, "embed_dim"} (see module docstring).

    vision: image_res (px), patch_size (px), embed_dim (stage-0 width), depths, num_heads (per stage),
    window_size, mlp_ratio (a ViT: kind 'vit' and `VIT_FIELDS`);
    text: vocab_size, hidden_size, num_heads, intermediate_size, num_layers,
    fusion_layer, max_position_embeddings, type_vocab_size, layer_norm_eps; embed_dim (ITC projection);
    CCLM-X2VLM adds `cross` (num_layers, num_heads, intermediate_size, layer_norm_eps).
    """
    v, t = model_config.vision, model_config.text
    if t.get("pool", "cls") != "cls":
        raise ValueError(f"model.text.pool={t.pool!r}: only CLS pooling can be exported (the official layout and the "
                         "PyTorch port have no other)")
    if v.get("kind", "swin") == "vit":
        vision = {name: v[name] for name in VIT_FIELDS}
    elif v.get("ape", False):
        raise ValueError("model.vision.ape: a Swin with an absolute position embedding cannot be exported yet (the "
                         "official layout and the PyTorch port have none)")
    else:
        vision = {"image_res": int(v.image_res), "patch_size": int(v.patch_size), "embed_dim": int(v.embed_dim),
                  "depths": [int(d) for d in v.depths], "num_heads": [int(h) for h in v.num_heads],
                  "window_size": int(v.window_size), "mlp_ratio": float(v.mlp_ratio)}
    cross = {"cross": model_config.cross.to_dict()} if "cross" in model_config else {}
    return {
        "vision": vision,
        "text": {"vocab_size": int(t.vocab_size), "hidden_size": int(t.hidden_size), "num_heads": int(t.num_heads),
                 "intermediate_size": int(t.intermediate_size), "num_layers": int(t.num_layers),
                 "fusion_layer": int(t.fusion_layer), "max_position_embeddings": int(t.max_position_embeddings),
                 "type_vocab_size": int(t.type_vocab_size), "layer_norm_eps": float(t.layer_norm_eps)},
        "embed_dim": int(model_config.embed_dim),
        **cross,
    }


class PlannedTensor(NamedTuple):
    """One tensor of a safetensors file: its name, shape, dtype, and how to produce its data when written."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]


def write_safetensors(path: str | os.PathLike, tensors: list[PlannedTensor], metadata: Mapping[str, str]) -> None:
    """Stream `tensors` into a safetensors file: 8-byte little-endian header size, JSON header, raw data.

    Data are laid out by decreasing item size (so every tensor is aligned to its item size), in list order
    within one size; the header is space-padded to a multiple of 8 bytes, as the reference writer does.
    """
    order = sorted(tensors, key=lambda t: -t.dtype.itemsize)  # stable: keeps list order within a size
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for t in order:
        nbytes = int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize
        header[t.key] = {"dtype": _SAFETENSORS_DTYPE_NAMES[t.dtype.name], "shape": list(t.shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    path = os.fspath(path)
    partial = path + ".partial"
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in order:
            data = np.asarray(t.produce(), order="C")
            if data.shape != t.shape or data.dtype != t.dtype:
                raise ValueError(f"{t.key}: produced {data.dtype}{data.shape}, planned {t.dtype}{t.shape}")
            f.write(memoryview(data.reshape(-1).view(np.uint8)))
    os.replace(partial, path)



def check_params(params: Mapping, model_config: ml_collections.ConfigDict, layout: str) -> dict:
    """Every parameter `layout` needs exists with the model's shape; raise ValueError naming the first
    offenders. Returns the model's parameter shapes (`shapes.param_shapes`)."""
    shapes = param_shapes(model_config, layout)
    paths = [e.path for e in official_layout(model_config, layout) if e.kind != "buffer"]
    problems = []
    for path in paths:
        try:
            shape = tuple(np.shape(get_path(params, path)))
        except (KeyError, TypeError):
            problems.append(f"{'/'.join(path)} missing")
            continue
        if shape != tuple(get_path(shapes, path)):
            problems.append(f"{'/'.join(path)} has shape {shape}, the model config needs {get_path(shapes, path)}")
    if problems:
        raise ValueError(f"params do not match the model config and the {layout!r} layout: {len(problems)} "
                         f"problem(s), first: {problems[:5]}")
    return shapes


def export_safetensors(out_dir: str | os.PathLike, model_config: ml_collections.ConfigDict, params: Mapping,
                       dtype: str = "float32", layout: str = "pretrain") -> pathlib.Path:
    """Write `out_dir/model.safetensors` and `out_dir/config.json`; returns the safetensors path.

    `params`: nested dict (jax or numpy arrays) of the model of `layout` for `model_config` (see
    `shapes.abstract_params`); `layout`: one of `layout.LAYOUTS` ('pretrain' is what the PyTorch module loads).
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {sorted(EXPORT_DTYPES)}")
    target = EXPORT_DTYPES[dtype]
    shapes = check_params(params, model_config, layout)
    entries = official_layout(model_config, layout)
    planned = []
    for entry in entries:
        if entry.kind == "buffer":
            buffer = np.array(entry.make(), order="C")
            planned.append(PlannedTensor(entry.key, buffer.shape, buffer.dtype, lambda b=buffer: b))
            continue

        def produce(entry=entry):
            value = np.asarray(jax.device_get(get_path(params, entry.path))).astype(target, copy=False)
            return to_torch_array(entry, value)

        planned.append(PlannedTensor(entry.key, torch_shape(entry, get_path(shapes, entry.path)), target, produce))
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SAFETENSORS_NAME
    write_safetensors(path, planned, {"format": "pt", "cclm_jax_layout": layout, "dtype": dtype})
    (out_dir / CONFIG_NAME).write_text(json.dumps(architecture_dict(model_config), indent=1) + "\n")
    return path
