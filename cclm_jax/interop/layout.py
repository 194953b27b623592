"""The official PyTorch state_dict layout of CCLM, key by key, and how each key maps to our parameters.

`official_layout(model_config, layout)` lists every entry of the official state_dict in the official order:
parameters (with the Flax path they come from and how the tensor is rearranged) and buffers (generated).
Both the importer and the exporter walk this one table, so the two directions cannot drift apart.

Layouts (`LAYOUTS`; the official class, and the Flax model whose parameters it holds, `LAYOUT_TASKS`):
- `pretrain` (`CrossViewLM`, our `CCLM`): `temp`, `vision_encoder`, `text_encoder.bert.*` (N layers, cross-attention
  from layer F), the MLM head under `text_encoder.cls.*` (decoder tied to the word embeddings), `text_proj`,
  `vision_proj`, `itm_head`, `bbox_head`.
- `retrieval` (`RetrievalModel`, our `CCLM` without MLM and box heads): as `pretrain` with `text_encoder.*` a
  plain BertModel (no `bert.` infix, no `cls.*`) and no `bbox_head`.
- `xvnli` (`XVLM4XVNLI`, our `tasks.XVNLIModel`): `vision_encoder`, `text_encoder.*`, `cls_head` = build_mlp(D, 3).
  No `temp`, projections or ITM head (the official class builds them only with the contrastive/matching losses).
- `nlvr` (`NLVRModel` for NLVR2 / MaRVL, our `tasks.NLVRModel`): `vision_encoder`, `text_encoder.*` with
  F + 2(N-F) layers (pre-trained fusion layer l copied to F+2(l-F), attending image 0, and F+2(l-F)+1, image 1),
  `cls_head` = build_mlp(D, 2). The copies of a pair share one cross-attention key/value Parameter
  (`share_cross_attention`), so the state_dict lists it under both layers' names: the odd copy's
  `crossattention.self.{key,value}.*` are tied to the even copy's, which our stored tree holds alone.
- `vqa` (`VQAModel` for xGQA, our `tasks.VQAModel`): `vision_encoder`, `text_encoder.*` (N layers),
  `text_decoder.bert.*` (a BertLMHeadModel: embeddings + N-F layers, every one with cross-attention to the
  question states) and its LM head `text_decoder.cls.predictions.*` (our `lm_head`; decoder weight tied to
  `text_decoder.bert.embeddings.word_embeddings.weight`, decoder bias to `text_decoder.cls.predictions.bias`).
`model_config` is always the pre-trained CCLM config (N text layers, fusion layer F), as the task models take it.
A CCLM-X2VLM config (`model.cross`) has one layout, `pretrain` (`x2vlm_layout`: X2-VLM's `CrossViewLM`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import ml_collections
import numpy as np

from cclm_jax.models import vit
from cclm_jax.models.swin import relative_position_index, shifted_window_mask, stage_geometry
from cclm_jax.models.tasks import nlvr_num_layers

# Official checkpoint layout -> the fine-tuning task (`tasks.TASKS`) whose model holds its parameters
# (None: the pre-training model).
LAYOUT_TASKS = {"pretrain": None, "retrieval": "retrieval", "xvnli": "xvnli", "nlvr": "marvl", "vqa": "xgqa"}
LAYOUTS = tuple(LAYOUT_TASKS)
TASK_LAYOUTS = {task: layout for layout, task in LAYOUT_TASKS.items() if task is not None}
_SHARED_KV = (".crossattention.self.key.", ".crossattention.self.value.")


def layout_of_task(task: str | None) -> str:
    """The official layout of a run's `task` (None or '': pre-training)."""
    if not task:
        return "pretrain"
    if task not in TASK_LAYOUTS:
        raise ValueError(f"no official checkpoint layout for task {task!r}; known tasks: {sorted(TASK_LAYOUTS)}")
    return TASK_LAYOUTS[task]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One state_dict key.

    `path`: the Flax parameter path (None for buffers). `kind`: how torch and Flax tensors relate:
    `plain` (same array), `bias` (torch flat (out,) = Flax bias of the output dims), `linear` (torch weight
    (out, in) = Flax kernel reshaped to (in, out) then transposed; `in_ndims` leading kernel dims are inputs),
    `conv` (torch OIHW = Flax HWIO transposed),
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
    if v.get("kind", "swin") == "vit":  # a CCLM with a ViT tower (configs/small_real.py: DINOv2)
        return vit_entries(v)
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


def vit_entries(v: ml_collections.ConfigDict, pre: str = "vision_encoder",
                root: tuple[str, ...] = ("vision_encoder",)) -> list[Entry]:
    """A `models.vit.VisionTransformer` of vision config `v` in the timm/BEiT key layout under `pre` (torch) /
    `root` (Flax), in the BEiT-v2 module order: cls_token, pos_embed, patch_embed, blocks, norm / fc_norm."""
    grid = v.image_res // v.patch_size
    entries = [Entry(f"{pre}.cls_token", root + ("cls_token",), "plain")]
    if v.pos_grid:
        entries.append(Entry(f"{pre}.pos_embed", root + ("pos_embed",), "plain"))
    entries += [Entry(f"{pre}.patch_embed.proj.weight", root + ("patch_embed", "proj", "kernel"), "conv"),
                Entry(f"{pre}.patch_embed.proj.bias", root + ("patch_embed", "proj", "bias"), "plain")]
    for b in range(v.depth):
        key, path = f"{pre}.blocks.{b}", root + (f"blocks_{b}",)
        if v.layer_scale_init:
            entries += [Entry(f"{key}.gamma_1", path + ("gamma_1",), "plain"),
                        Entry(f"{key}.gamma_2", path + ("gamma_2",), "plain")]
        entries += _norm(f"{key}.norm1", path + ("norm1",))
        if v.qkv_bias == "qv":
            entries += [Entry(f"{key}.attn.q_bias", path + ("attn", "q_bias"), "bias"),
                        Entry(f"{key}.attn.v_bias", path + ("attn", "v_bias"), "bias")]
        if v.rel_pos_bias:
            entries += [Entry(f"{key}.attn.relative_position_bias_table",
                              path + ("attn", "relative_position_bias_table"), "plain"),
                        Entry(f"{key}.attn.relative_position_index", None, "buffer",
                              make=lambda g=grid: vit.relative_position_index(g).astype(np.int64))]
        entries += [*_linear(f"{key}.attn.qkv", path + ("attn", "qkv"), bias=v.qkv_bias == "qkv"),
                    *_linear(f"{key}.attn.proj", path + ("attn", "proj"), in_ndims=2),
                    *_norm(f"{key}.norm2", path + ("norm2",)),
                    *_linear(f"{key}.mlp.fc1", path + ("mlp", "fc1")),
                    *_linear(f"{key}.mlp.fc2", path + ("mlp", "fc2"))]
    final = "fc_norm" if v.pool == "mean" else "norm"
    return entries + _norm(f"{pre}.{final}", root + (final,))


def _attention_entries(key: str, path: tuple[str, ...]) -> list[Entry]:
    entries = []
    for proj in ("query", "key", "value"):
        entries += _linear(f"{key}.self.{proj}", path + ("self", proj))
    entries += _linear(f"{key}.output.dense", path + ("output", "dense"), in_ndims=2)
    entries += _norm(f"{key}.output.LayerNorm", path + ("output", "LayerNorm"))
    return entries


def _bert_entries(cfg: ml_collections.ConfigDict, bert: str, root: tuple[str, ...], num_layers: int,
                  fusion_layer: int, shared_cross_kv: bool = False, embeddings: bool = True) -> list[Entry]:
    """A BertModel under `bert` (torch) / `root` (Flax): embeddings (unless `embeddings=False`: X2-VLM's cross
    encoder) and `num_layers` layers, cross-attention from `fusion_layer` on. `shared_cross_kv`: the NLVR stack,
    layer F+2j+1's cross key/value tied to layer F+2j's."""
    t = cfg.text
    emb = f"{bert}.embeddings"
    entries = [
        Entry(f"{emb}.position_ids", None, "buffer",
              make=lambda: np.arange(t.max_position_embeddings, dtype=np.int64)[None]),
        Entry(f"{emb}.word_embeddings.weight", root + ("embeddings", "word_embeddings"), "plain"),
        Entry(f"{emb}.position_embeddings.weight", root + ("embeddings", "position_embeddings"), "plain"),
        Entry(f"{emb}.token_type_embeddings.weight", root + ("embeddings", "token_type_embeddings"), "plain"),
        *_norm(f"{emb}.LayerNorm", root + ("embeddings", "LayerNorm")),
    ] if embeddings else []
    for i in range(num_layers):
        key, path = f"{bert}.encoder.layer.{i}", root + (f"layer_{i}",)
        entries += _attention_entries(f"{key}.attention", path + ("attention",))
        if i >= fusion_layer:
            cross = _attention_entries(f"{key}.crossattention", path + ("crossattention",))
            if shared_cross_kv and (i - fusion_layer) % 2 == 1:
                cross = [_tie_to_even_copy(e, bert, root, i) for e in cross]
            entries += cross
        entries += _linear(f"{key}.intermediate.dense", path + ("intermediate", "dense"))
        entries += _linear(f"{key}.output.dense", path + ("output", "dense"))
        entries += _norm(f"{key}.output.LayerNorm", path + ("output", "LayerNorm"))
    return entries


def _tie_to_even_copy(entry: Entry, bert: str, root: tuple[str, ...], i: int) -> Entry:
    """Odd NLVR copy `i`: its cross-attention key/value entries name layer i-1's tensor and parameter."""
    if not any(part in entry.key for part in _SHARED_KV):
        return entry
    layer, even = f"{bert}.encoder.layer.{i}.", f"{bert}.encoder.layer.{i - 1}."
    path = root + (f"layer_{i - 1}",) + entry.path[len(root) + 1:]
    return dataclasses.replace(entry, path=path, tied_to=entry.key.replace(layer, even, 1))


def _mlm_entries(pre: str, root: tuple[str, ...], words_key: str, words_path: tuple[str, ...]) -> list[Entry]:
    """A BertLMPredictionHead under `pre`: decoder weight tied to `words_key`, decoder bias to `{pre}.bias`."""
    return [
        Entry(f"{pre}.bias", root + ("bias",), "plain"),
        *_linear(f"{pre}.transform.dense", root + ("transform", "dense")),
        *_norm(f"{pre}.transform.LayerNorm", root + ("transform", "LayerNorm")),
        Entry(f"{pre}.decoder.weight", words_path, "plain", tied_to=words_key),
        Entry(f"{pre}.decoder.bias", root + ("bias",), "plain", tied_to=f"{pre}.bias"),
    ]


def _mlp_head_entries(name: str) -> list[Entry]:
    return [*_linear(f"{name}.0", (name, "fc1")), *_norm(f"{name}.1", (name, "norm")),
            *_linear(f"{name}.3", (name, "fc2"))]


def official_layout(model_config: ml_collections.ConfigDict, layout: str = "pretrain") -> list[Entry]:
    """Every key of the official state_dict of `layout` for this (pre-trained) architecture, in the official
    order (a module's own parameters and buffers, then its children in registration order)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")
    t = model_config.text
    n, fusion = t.num_layers, t.fusion_layer
    text = ("text_encoder",)
    if "cross" in model_config:
        if layout != "pretrain":
            raise ValueError(f"no CCLM-X2VLM checkpoint layout {layout!r} (only 'pretrain')")
        return x2vlm_layout(model_config)
    if layout == "pretrain":
        words = ("text_encoder.bert.embeddings.word_embeddings.weight", text + ("embeddings", "word_embeddings"))
        return [Entry("temp", ("temp",), "plain"), *_vision_entries(model_config),
                *_bert_entries(model_config, "text_encoder.bert", text, n, fusion),
                *_mlm_entries("text_encoder.cls.predictions", ("mlm_head",), *words),
                *_linear("text_proj", ("text_proj",)), *_linear("vision_proj", ("vision_proj",)),
                *_mlp_head_entries("itm_head"), *_mlp_head_entries("bbox_head")]
    if layout == "retrieval":
        return [Entry("temp", ("temp",), "plain"), *_vision_entries(model_config),
                *_bert_entries(model_config, "text_encoder", text, n, fusion),
                *_linear("text_proj", ("text_proj",)), *_linear("vision_proj", ("vision_proj",)),
                *_mlp_head_entries("itm_head")]
    if layout == "xvnli":
        return [*_vision_entries(model_config), *_bert_entries(model_config, "text_encoder", text, n, fusion),
                *_mlp_head_entries("cls_head")]
    if layout == "nlvr":
        return [*_vision_entries(model_config),
                *_bert_entries(model_config, "text_encoder", text, nlvr_num_layers(n, fusion), fusion,
                               shared_cross_kv=True),
                *_mlp_head_entries("cls_head")]
    decoder = ("text_decoder",)
    words = ("text_decoder.bert.embeddings.word_embeddings.weight", decoder + ("embeddings", "word_embeddings"))
    return [*_vision_entries(model_config), *_bert_entries(model_config, "text_encoder", text, n, fusion),
            *_bert_entries(model_config, "text_decoder.bert", decoder, n - fusion, 0),
            *_mlm_entries("text_decoder.cls.predictions", ("lm_head",), *words)]


def x2vlm_layout(model_config: ml_collections.ConfigDict) -> list[Entry]:
    """X2-VLM's `CrossViewLM` state_dict: `temp`, `vision_encoder.*` (BEiT-v2), `text_encoder.*` (RobertaModel, no
    cross-attention), `cross_encoder.encoder.layer.*` (BERT layers with cross-attention, no embeddings),
    `vision_proj`, `text_proj`, `itm_head`, `bbox_head`, `mlm_head.predictions.*` (untied decoder; its bias tied
    to `mlm_head.predictions.bias`)."""
    n = model_config.text.num_layers
    pre, root = "mlm_head.predictions", ("mlm_head",)
    return [Entry("temp", ("temp",), "plain"), *vit_entries(model_config.vision),
            *_bert_entries(model_config, "text_encoder", ("text_encoder",), n, n),
            *_bert_entries(model_config, "cross_encoder", ("cross_encoder",), model_config.cross.num_layers, 0,
                           embeddings=False),
            *_linear("vision_proj", ("vision_proj",)), *_linear("text_proj", ("text_proj",)),
            *_mlp_head_entries("itm_head"), *_mlp_head_entries("bbox_head"),
            Entry(f"{pre}.bias", root + ("bias",), "plain"),
            *_linear(f"{pre}.transform.dense", root + ("transform", "dense")),
            *_norm(f"{pre}.transform.LayerNorm", root + ("transform", "LayerNorm")),
            Entry(f"{pre}.decoder.weight", root + ("decoder",), "plain"),
            Entry(f"{pre}.decoder.bias", root + ("bias",), "plain", tied_to=f"{pre}.bias")]


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
