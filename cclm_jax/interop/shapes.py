"""Parameter shapes of a model config, without allocating anything (`jax.eval_shape` of `init`).

`param_shapes` traces the model once per distinct config (cached: a trace of the full model takes seconds);
`official_shapes` lists the official state_dict (key, shape, dtype) the layout table implies.
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from cclm_jax.interop.layout import get_path, official_layout, torch_shape
from cclm_jax.models import base_model_config, build_model


def abstract_params(model_config: ml_collections.ConfigDict):
    """Boxed (logically partitioned) ShapeDtypeStructs of the model's parameters."""
    model = build_model(model_config)
    res = model_config.vision.image_res
    image = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), image, ids, ids)
    return variables["params"]


@functools.lru_cache(maxsize=16)
def _cached_shapes(config_json: str) -> dict:
    model_config = ml_collections.ConfigDict(json.loads(config_json))
    return jax.tree.map(lambda x: tuple(x.shape), nn.meta.unbox(abstract_params(model_config)))


# Config fields that change no parameter shape: normalised away so that configs differing only in them
# share one trace.
_SHAPE_FREE_FIELDS = ("temp", "dtype", "remat", "vision.drop_path_rate", "text.hidden_dropout",
                      "text.attention_dropout", "text.pad_token_id")


def param_shapes(model_config: ml_collections.ConfigDict) -> dict:
    """Nested dict of parameter shapes (tuples); a fresh dict on every call."""
    config = model_config.to_dict()
    defaults = base_model_config().to_dict()
    for field in _SHAPE_FREE_FIELDS:
        *parents, name = field.split(".")
        node, default = config, defaults
        for part in parents:
            node, default = node[part], default[part]
        node[name] = default[name]
    cached = _cached_shapes(json.dumps(config, sort_keys=True))
    return jax.tree.map(lambda shape: shape, cached, is_leaf=lambda x: isinstance(x, tuple))


def official_shapes(model_config: ml_collections.ConfigDict,
                    layout: str = "pretrain") -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype name) of every official state_dict entry, in order, as `save` writes them.

    Parameters are float32; buffers are generated (small: masks and index tables), parameters are not.
    """
    shapes = param_shapes(model_config)
    out = []
    for entry in official_layout(model_config, layout):
        if entry.kind == "buffer":
            buffer = entry.make()
            out.append((entry.key, tuple(buffer.shape), np.dtype(buffer.dtype).name))
            continue
        out.append((entry.key, torch_shape(entry, get_path(shapes, entry.path)), "float32"))
    return out
