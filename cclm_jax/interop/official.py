"""Import and export of official CCLM PyTorch checkpoints (`{'model': state_dict, 'config': ...}` `.th`).

`load(path, text_num_heads=None, **overrides) -> (model_config, params)` infers the architecture from the
tensor shapes and key counts (depths, widths, vocabulary, window, image size, fusion layer), takes what
shapes cannot tell (the text attention heads) from `text_num_heads`, and maps every tensor onto our Flax
parameter tree. `save(path, model_config, params)` writes the official key set, order, shapes and dtypes,
buffers included and the tied MLM decoder under both names. Needs the `torch` extra.

Files are read with `torch.load(weights_only=True)`: a checkpoint from the internet cannot run code.
"""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import torch

from cclm_jax.interop.layout import Entry, from_torch_array, official_layout, to_torch_array
from cclm_jax.models.config import base_model_config, validate_model_config

# Attention heads by text width for the checkpoints CCLM is built from (XLM-R large / base).
KNOWN_TEXT_HEADS = {1024: 16, 768: 12}


class CheckpointError(ValueError):
    """A checkpoint that does not match the expected layout; the message names the offending keys."""


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `.th`/`.pth`/`.bin` file holding `{'model': state_dict}` or a bare state_dict, as numpy."""
    try:
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated, corrupt, or contains pickled code
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict (or {{'model': state_dict}}) of tensors")
    return {k: v.detach().cpu().numpy() for k, v in obj.items()}


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """'pretrain' (CrossViewLM) or 'retrieval' (RetrievalModel) from the text encoder's key prefix."""
    if "text_encoder.bert.embeddings.word_embeddings.weight" in state_dict:
        return "pretrain"
    if "text_encoder.embeddings.word_embeddings.weight" in state_dict:
        return "retrieval"
    raise CheckpointError("no text_encoder word embeddings found (looked for "
                          "'text_encoder.bert.embeddings.word_embeddings.weight' and "
                          "'text_encoder.embeddings.word_embeddings.weight')")


def _count(pattern: str, keys) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def infer_model_config(state_dict: Mapping[str, np.ndarray], text_num_heads: int | None = None,
                       **overrides) -> ml_collections.ConfigDict:
    """The `model` config of a state_dict: everything from shapes, text heads from the argument."""
    sd, keys = state_dict, list(state_dict)
    bert = "text_encoder.bert" if detect_layout(sd) == "pretrain" else "text_encoder"
    cfg = base_model_config()
    v, t = cfg.vision, cfg.text
    try:
        patch = sd["vision_encoder.patch_embed.proj.weight"]
        v.embed_dim, v.patch_size = int(patch.shape[0]), int(patch.shape[2])
        n_stages = _count(r"vision_encoder\.layers\.(\d+)\.", keys)
        v.depths = tuple(_count(rf"vision_encoder\.layers\.{s}\.blocks\.(\d+)\.", keys) for s in range(n_stages))
        tables = [sd[f"vision_encoder.layers.{s}.blocks.0.attn.relative_position_bias_table"] for s in range(n_stages)]
        v.num_heads = tuple(int(tb.shape[1]) for tb in tables)
        v.window_size = (int(round(math.sqrt(tables[0].shape[0]))) + 1) // 2
        v.mlp_ratio = sd["vision_encoder.layers.0.blocks.0.mlp.fc1.weight"].shape[0] / v.embed_dim
        v.image_res = _image_res(sd, v.window_size, v.patch_size)
        words = sd[f"{bert}.embeddings.word_embeddings.weight"]
        t.vocab_size, t.hidden_size = int(words.shape[0]), int(words.shape[1])
        t.max_position_embeddings = int(sd[f"{bert}.embeddings.position_embeddings.weight"].shape[0])
        t.type_vocab_size = int(sd[f"{bert}.embeddings.token_type_embeddings.weight"].shape[0])
        t.intermediate_size = int(sd[f"{bert}.encoder.layer.0.intermediate.dense.weight"].shape[0])
        t.num_layers = _count(rf"{re.escape(bert)}\.encoder\.layer\.(\d+)\.", keys)
        cross = [i for i in range(t.num_layers) if f"{bert}.encoder.layer.{i}.crossattention.self.query.weight" in sd]
        t.fusion_layer = cross[0] if cross else t.num_layers
        t.mask_token_id = t.vocab_size - 1
        cfg.embed_dim = int(sd["text_proj.weight"].shape[0])
        cfg.temp = float(sd["temp"]) if "temp" in sd else cfg.temp
    except KeyError as e:
        raise CheckpointError(f"cannot infer the architecture: missing key {e.args[0]!r}") from e
    if text_num_heads is None:
        text_num_heads = KNOWN_TEXT_HEADS.get(t.hidden_size, max(1, t.hidden_size // 32))
        logging.info("text attention heads not given; using %d for hidden size %d", text_num_heads,
                     t.hidden_size)
    t.num_heads = int(text_num_heads)
    _apply_overrides(cfg, overrides)
    validate_model_config(cfg)
    return cfg


def _image_res(sd: Mapping[str, np.ndarray], window: int, patch: int) -> int:
    """Image size from the first shifted block's attention mask (nW windows of window^2 tokens)."""
    mask = sd.get("vision_encoder.layers.0.blocks.1.attn_mask")
    if mask is not None:
        return int(round(math.sqrt(mask.shape[0]))) * window * patch
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


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], model_config: ml_collections.ConfigDict,
                           layout: str | None = None) -> dict:
    """Map an official state_dict onto a nested dict of float32 numpy parameters."""
    from cclm_jax.interop.shapes import param_shapes

    layout = layout or detect_layout(state_dict)
    entries = official_layout(model_config, layout)
    shapes = param_shapes(model_config)
    expected = {e.key for e in entries}
    unknown = [k for k in state_dict if k not in expected]
    missing = [e.key for e in entries if e.kind != "buffer" and e.key not in state_dict]
    if unknown or missing:
        raise CheckpointError(_key_report(unknown, missing))
    params: dict = {}
    for entry in entries:
        if entry.kind == "buffer" or entry.tied_to is not None:
            _check_tied(entry, state_dict)
            continue
        shape = _lookup(shapes, entry.path)
        value = from_torch_array(entry, np.asarray(state_dict[entry.key], np.float32), shape)
        _insert(params, entry.path, value)
    return params


def _check_tied(entry: Entry, state_dict: Mapping[str, np.ndarray]) -> None:
    if entry.tied_to and entry.key in state_dict and entry.tied_to in state_dict:
        if not np.array_equal(state_dict[entry.key], state_dict[entry.tied_to]):
            raise CheckpointError(f"{entry.key} must equal {entry.tied_to} (tied weights), but they differ")


def _key_report(unknown: list[str], missing: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s), first: {missing[:5]}")
    if unknown:
        parts.append(f"{len(unknown)} unexpected key(s), first: {unknown[:5]}")
    return "checkpoint does not match the architecture: " + "; ".join(parts)


def _lookup(tree: Mapping, path: tuple[str, ...]):
    for part in path:
        tree = tree[part]
    return tree


def _insert(tree: dict, path: tuple[str, ...], value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def load(path: str | os.PathLike, text_num_heads: int | None = None, **overrides):
    """Read an official CCLM checkpoint -> (model_config, params as a nested dict of jax arrays).

    `text_num_heads`: attention heads of the text stack (shapes cannot tell; 16 for XLM-R-large).
    `overrides`: model config fields, nested with '__' (e.g. `vision__image_res=384`, `dtype='bfloat16'`).
    """
    state_dict = read_state_dict(path)
    model_config = infer_model_config(state_dict, text_num_heads, **overrides)
    params = params_from_state_dict(state_dict, model_config)
    return model_config, jax.tree.map(jax.numpy.asarray, params)


def state_dict_from_params(model_config: ml_collections.ConfigDict, params: Mapping,
                           layout: str = "pretrain") -> dict[str, torch.Tensor]:
    """Our parameters -> the official state_dict (ordered; float32 weights, int64/float32 buffers)."""
    out: dict[str, torch.Tensor] = {}
    for entry in official_layout(model_config, layout):
        if entry.tied_to is not None:
            out[entry.key] = out[entry.tied_to]  # the same tensor under both names, as the official file
        elif entry.kind == "buffer":
            out[entry.key] = torch.from_numpy(np.array(entry.make(), order="C"))
        else:
            value = np.asarray(jax.device_get(_lookup(params, entry.path)), np.float32)
            out[entry.key] = torch.from_numpy(np.array(to_torch_array(entry, value), order="C"))
    return out


def save(path: str | os.PathLike, model_config: ml_collections.ConfigDict, params: Mapping,
         layout: str = "pretrain", extra_config: Mapping | None = None) -> None:
    """Write `{'model': state_dict, 'config': dict}` loadable by the official code with no key mismatch."""
    config = {"cclm_jax_model": model_config.to_dict(), **(dict(extra_config) if extra_config else {})}
    config.setdefault("embed_dim", model_config.embed_dim)
    config.setdefault("temp", model_config.temp)
    config.setdefault("image_res", model_config.vision.image_res)
    torch.save({"model": state_dict_from_params(model_config, params, layout), "config": config},
               os.fspath(path))
