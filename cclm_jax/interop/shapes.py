"""Parameter shapes of a model config, without allocating anything (`jax.eval_shape` of `init`).

Each official layout (`layout.LAYOUTS`) holds the parameters of one Flax model: `pretrain` the CCLM module,
`retrieval` the CCLM module without `mlm_head` and `bbox_head` (what `tasks.init_retrieval_params` keeps),
`xvnli` / `nlvr` / `vqa` the task models of `models.tasks` (the NLVR tree as stored: one cross-attention
key/value per pair of fusion copies). `param_shapes` traces a model once per distinct (config, layout)
(cached: a trace of the full model takes seconds); `official_shapes` lists the official state_dict (key,
shape, dtype) the layout table implies.
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from cclm_jax.interop.layout import LAYOUTS, get_path, official_layout, torch_shape
from cclm_jax.models import base_model_config, build_model, tasks

RETRIEVAL_DROPS = ("mlm_head", "bbox_head")  # CCLM parameters the retrieval model does not keep


def abstract_params(model_config: ml_collections.ConfigDict, layout: str = "pretrain"):
    """Boxed (logically partitioned) ShapeDtypeStructs of the parameters of `layout`'s model."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")
    res = model_config.vision.image_res
    image = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    key = jax.random.PRNGKey(0)
    if layout in ("pretrain", "retrieval"):
        params = jax.eval_shape(build_model(model_config).init, key, image, ids, ids)["params"]
        return params if layout == "pretrain" else {k: v for k, v in params.items() if k not in RETRIEVAL_DROPS}
    if layout == "xvnli":
        return jax.eval_shape(tasks.XVNLIModel(model_config).init, key, image, ids, ids)["params"]
    if layout == "nlvr":  # NLVRModel.init returns the stored tree (shared key/value once)
        return jax.eval_shape(tasks.NLVRModel(model_config).init, key, image, image, ids, ids)["params"]
    return jax.eval_shape(tasks.VQAModel(model_config).init, key, image, ids, ids, ids, ids)["params"]


@functools.lru_cache(maxsize=16)
def _cached_shapes(config_json: str, layout: str) -> dict:
    model_config = ml_collections.ConfigDict(json.loads(config_json))
    return jax.tree.map(lambda x: tuple(x.shape), nn.meta.unbox(abstract_params(model_config, layout)))


# Config fields that change no parameter shape: normalised away so that configs differing only in them
# share one trace.
_SHAPE_FREE_FIELDS = ("temp", "dtype", "remat", "vision.drop_path_rate", "text.hidden_dropout",
                      "text.attention_dropout", "text.pad_token_id")


def param_shapes(model_config: ml_collections.ConfigDict, layout: str = "pretrain") -> dict:
    """Nested dict of the parameter shapes (tuples) of `layout`'s model; a fresh dict on every call."""
    config = model_config.to_dict()
    defaults = base_model_config().to_dict()
    for field in _SHAPE_FREE_FIELDS:
        *parents, name = field.split(".")
        node, default = config, defaults
        for part in parents:
            node, default = node[part], default[part]
        node[name] = default[name]
    cached = _cached_shapes(json.dumps(config, sort_keys=True), layout)
    return jax.tree.map(lambda shape: shape, cached, is_leaf=lambda x: isinstance(x, tuple))


def official_shapes(model_config: ml_collections.ConfigDict,
                    layout: str = "pretrain") -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype name) of every official state_dict entry, in order, as `save` writes them.

    Parameters are float32; buffers are generated (small: masks and index tables), parameters are not.
    """
    shapes = param_shapes(model_config, layout)
    out = []
    for entry in official_layout(model_config, layout):
        if entry.kind == "buffer":
            buffer = entry.make()
            out.append((entry.key, tuple(buffer.shape), np.dtype(buffer.dtype).name))
            continue
        out.append((entry.key, torch_shape(entry, get_path(shapes, entry.path)), "float32"))
    return out
