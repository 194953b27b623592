"""Parameter shapes of a model config, without allocating anything (`jax.eval_shape` of `init`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from cclm_jax.models import build_model


def abstract_params(model_config: ml_collections.ConfigDict):
    """Boxed (logically partitioned) ShapeDtypeStructs of the model's parameters."""
    model = build_model(model_config)
    res = model_config.vision.image_res
    image = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), image, ids, ids)
    return variables["params"]


def param_shapes(model_config: ml_collections.ConfigDict) -> dict:
    """Nested dict of parameter shapes (tuples)."""
    return jax.tree.map(lambda x: tuple(x.shape), nn.meta.unbox(abstract_params(model_config)))
