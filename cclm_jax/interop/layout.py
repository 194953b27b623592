"""The official PyTorch state_dict layout of CCLM, key by key, and how each key maps to our parameters.

`official_layout(model_config, layout)` lists every entry of the official state_dict in the official order:
parameters (with the Flax path they come from and how the tensor is rearranged) and buffers (generated).
Both the importer and the exporter walk this one table, so the two directions cannot drift apart.

Layouts: `pretrain` (`CrossViewLM`: `text_encoder.bert.*`, MLM head under `text_encoder.cls.*`, `bbox_head`)
and `retrieval` (`RetrievalModel`: `text_encoder.*` = a plain BertModel, no MLM head, no bbox head).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import ml_collections
import numpy as np

from cclm_jax.models.swin import relative_position_index, shifted_window_mask, stage_geometry

LAYOUTS = ("pretrain", "retrieval")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One state_dict key.

    `path`: the Flax parameter path (None for buffers). `kind`: how torch and Flax tensors relate:
    `plain` (same array), `bias` (torch flat (out,) = Flax bias of the output dims), `linear` (torch weight (out, in) = Flax kernel reshaped to (in, out) then
    transposed; `in_ndims` leading kernel dims are inputs), `conv` (torch OIHW = Flax HWIO transposed),
    `buffer` (not a parameter; `make` builds it). `tied_to`: another torch key holding the same tensor.
    """

    key: str
    path: tuple[str, ...] | None
    kind: str
    in_ndims: int = 1
    make: Callable[[], np.ndarray] | None = None
    tied_to: str | None = None


def _linear(key: str, path: tuple[str, ...], in_ndims: int = 1, bias: bool = True) -> list[Entry]:
    entries = [Entry(f"{key}.weight", path + ("kernel",), "linear", in_ndims)]
    if bias:
        entries.append(Entry(f"{key}.bias", path + ("bias",), "bias"))
    return entries


def _norm(key: str, path: tuple[str, ...]) -> list[Entry]:
    return [Entry(f"{key}.weight", path + ("scale",), "plain"), Entry(f"{key}.bias", path + ("bias",), "plain")]


def _vision_entries(cfg: ml_collections.ConfigDict) -> list[Entry]:
    v = cfg.vision
    pre, root = "vision_encoder", ("vision_encoder",)
    entries = [
        Entry(f"{pre}.patch_embed.proj.weight", root + ("patch_embed", "proj", "kernel"), "conv"),
        Entry(f"{pre}.patch_embed.proj.bias", root + ("patch_embed", "proj", "bias"), "plain"),
        *_norm(f"{pre}.patch_embed.norm", root + ("patch_embed", "norm")),
    ]
    grid = v.image_res // v.patch_size
    for s, depth in enumerate(v.depths):
        res = grid // 2 ** s
        window, shifts = stage_geometry(res, v.window_size)
        for b in range(depth):
            key, path = f"{pre}.layers.{s}.blocks.{b}", root + (f"layers_{s}", f"blocks_{b}")
            if shifts and b % 2 == 1:
                entries.append(Entry(f"{key}.attn_mask", None, "buffer",
                                     make=lambda r=res, w=window: shifted_window_mask(r, w, w // 2)))
            entries += [
                *_norm(f"{key}.norm1", path + ("norm1",)),
                Entry(f"{key}.attn.relative_position_bias_table",
                      path + ("attn", "relative_position_bias_table"), "plain"),
                Entry(f"{key}.attn.relative_position_index", None, "buffer",
                      make=lambda w=window: relative_position_index(w).astype(np.int64)),
                *_linear(f"{key}.attn.qkv", path + ("attn", "qkv")),
                *_linear(f"{key}.attn.proj", path + ("attn", "proj"), in_ndims=2),
                *_norm(f"{key}.norm2", path + ("norm2",)),
                *_linear(f"{key}.mlp.fc1", path + ("mlp", "fc1")),
                *_linear(f"{key}.mlp.fc2", path + ("mlp", "fc2")),
            ]
        if s < len(v.depths) - 1:
            key, path = f"{pre}.layers.{s}.downsample", root + (f"layers_{s}", "downsample")
            entries += [*_linear(f"{key}.reduction", path + ("reduction",), bias=False),
                        *_norm(f"{key}.norm", path + ("norm",))]
    entries += _norm(f"{pre}.norm", root + ("norm",))
    return entries


def _attention_entries(key: str, path: tuple[str, ...]) -> list[Entry]:
    entries = []
    for proj in ("query", "key", "value"):
        entries += _linear(f"{key}.self.{proj}", path + ("self", proj))
    entries += _linear(f"{key}.output.dense", path + ("output", "dense"), in_ndims=2)
    entries += _norm(f"{key}.output.LayerNorm", path + ("output", "LayerNorm"))
    return entries


def _text_entries(cfg: ml_collections.ConfigDict, bert: str) -> list[Entry]:
    t = cfg.text
    root = ("text_encoder",)
    emb = f"{bert}.embeddings"
    entries = [
        Entry(f"{emb}.position_ids", None, "buffer",
              make=lambda: np.arange(t.max_position_embeddings, dtype=np.int64)[None]),
        Entry(f"{emb}.word_embeddings.weight", root + ("embeddings", "word_embeddings"), "plain"),
        Entry(f"{emb}.position_embeddings.weight", root + ("embeddings", "position_embeddings"), "plain"),
        Entry(f"{emb}.token_type_embeddings.weight", root + ("embeddings", "token_type_embeddings"), "plain"),
        *_norm(f"{emb}.LayerNorm", root + ("embeddings", "LayerNorm")),
    ]
    for i in range(t.num_layers):
        key, path = f"{bert}.encoder.layer.{i}", root + (f"layer_{i}",)
        entries += _attention_entries(f"{key}.attention", path + ("attention",))
        if i >= t.fusion_layer:
            entries += _attention_entries(f"{key}.crossattention", path + ("crossattention",))
        entries += _linear(f"{key}.intermediate.dense", path + ("intermediate", "dense"))
        entries += _linear(f"{key}.output.dense", path + ("output", "dense"))
        entries += _norm(f"{key}.output.LayerNorm", path + ("output", "LayerNorm"))
    return entries


def _mlm_entries() -> list[Entry]:
    pre, root = "text_encoder.cls.predictions", ("mlm_head",)
    return [
        Entry(f"{pre}.bias", root + ("bias",), "plain"),
        *_linear(f"{pre}.transform.dense", root + ("transform", "dense")),
        *_norm(f"{pre}.transform.LayerNorm", root + ("transform", "LayerNorm")),
        Entry(f"{pre}.decoder.weight", ("text_encoder", "embeddings", "word_embeddings"), "plain",
              tied_to="text_encoder.bert.embeddings.word_embeddings.weight"),
        Entry(f"{pre}.decoder.bias", root + ("bias",), "plain", tied_to=f"{pre}.bias"),
    ]


def _mlp_head_entries(name: str) -> list[Entry]:
    return [*_linear(f"{name}.0", (name, "fc1")), *_norm(f"{name}.1", (name, "norm")),
            *_linear(f"{name}.3", (name, "fc2"))]


def official_layout(model_config: ml_collections.ConfigDict, layout: str = "pretrain") -> list[Entry]:
    """Every key of the official state_dict for this architecture, in the official order."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")
    pretrain = layout == "pretrain"
    entries = [Entry("temp", ("temp",), "plain")]
    entries += _vision_entries(model_config)
    entries += _text_entries(model_config, "text_encoder.bert" if pretrain else "text_encoder")
    if pretrain:
        entries += _mlm_entries()
    entries += _linear("text_proj", ("text_proj",)) + _linear("vision_proj", ("vision_proj",))
    entries += _mlp_head_entries("itm_head")
    if pretrain:
        entries += _mlp_head_entries("bbox_head")
    return entries


def to_torch_array(entry: Entry, value: np.ndarray) -> np.ndarray:
    """Flax parameter -> the official tensor layout (numpy, same dtype)."""
    if entry.kind == "plain":
        return value
    if entry.kind == "bias":
        return value.reshape(-1)
    if entry.kind == "conv":
        return np.transpose(value, (3, 2, 0, 1))
    if entry.kind == "linear":
        n_in = int(np.prod(value.shape[: entry.in_ndims]))
        return value.reshape(n_in, -1).T
    raise ValueError(f"{entry.key}: no tensor conversion for kind {entry.kind!r}")


def torch_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The official tensor shape of a parameter whose Flax shape is `shape` (no data touched)."""
    shape = tuple(int(d) for d in shape)
    if entry.kind == "plain":
        return shape
    if entry.kind == "bias":
        return (int(np.prod(shape)),)
    if entry.kind == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    if entry.kind == "linear":
        n_in = int(np.prod(shape[: entry.in_ndims]))
        return (int(np.prod(shape)) // n_in, n_in)
    raise ValueError(f"{entry.key}: no tensor conversion for kind {entry.kind!r}")


def from_torch_array(entry: Entry, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Official tensor -> a Flax parameter of `shape`; raises ValueError on a size mismatch.

    The result may be a view of `tensor` (no copy): copy it if it must outlive the source.
    """
    if entry.kind == "conv":
        out = np.transpose(tensor, (2, 3, 1, 0))
    elif entry.kind == "linear":
        if tensor.ndim != 2:
            raise ValueError(f"{entry.key}: expected a 2-D Linear weight, got shape {tensor.shape}")
        out = tensor.T
    elif entry.kind == "bias":
        out = tensor.reshape(shape) if tensor.size == int(np.prod(shape)) else tensor
    else:
        out = tensor
    n_in = int(np.prod(shape[: entry.in_ndims])) if entry.kind == "linear" else None
    expected = (n_in, int(np.prod(shape)) // n_in) if entry.kind == "linear" else tuple(shape)
    if out.shape != expected:
        raise ValueError(f"{entry.key}: shape {tuple(tensor.shape)} does not fit parameter "
                         f"{'/'.join(entry.path)} of shape {tuple(shape)}")
    return out.reshape(shape)


def get_path(tree: Mapping, path: tuple[str, ...]):
    """The leaf of a nested dict at `path` (KeyError if absent)."""
    for part in path:
        tree = tree[part]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    """Put `value` at `path` of a nested dict, creating the intermediate dicts."""
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def torch_names(model_config: ml_collections.ConfigDict, layout: str = "pretrain") -> dict[tuple[str, ...], str]:
    """Flax parameter path -> its official state_dict key (parameters only, the first name of tied ones)."""
    return {e.path: e.key for e in official_layout(model_config, layout)
            if e.kind != "buffer" and e.tied_to is None}
