"""Sharded initialisation and execution of the tiny model on 8 fake CPU devices."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from cclm_jax import parallel
from cclm_jax.interop.shapes import abstract_params
from cclm_jax.models import build_model, tiny_model_config

GOLDEN_SPECS = pathlib.Path(__file__).parent / "golden" / "tiny_partition_specs_fsdp4_tensor2.txt"


def _flat_specs(mesh):
    specs = parallel.partition_specs(abstract_params(tiny_model_config()), mesh)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    return {"/".join(k.key for k in path): str(spec) for path, spec in flat}


def test_partition_specs_match_golden_dump():
    """Regression guard: every parameter's PartitionSpec on a (fsdp=4, tensor=2) mesh."""
    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    got = _flat_specs(mesh)
    expected = dict(line.split("\t") for line in GOLDEN_SPECS.read_text().splitlines())
    assert got == expected


def test_fsdp_shards_the_word_embedding_and_tensor_splits_heads():
    specs = _flat_specs(parallel.make_mesh({"fsdp": 4, "tensor": 2}))
    assert specs["text_encoder/embeddings/word_embeddings"] == str(P("tensor", "fsdp"))
    assert specs["text_encoder/layer_0/attention/self/query/kernel"] == str(P("fsdp", "tensor"))
    assert specs["text_encoder/layer_0/intermediate/dense/kernel"] == str(P("fsdp", "tensor"))
    # 1 head in Swin stage 0 cannot be split over 2 tensor shards: that dim stays replicated.
    assert specs["vision_encoder/layers_0/blocks_0/attn/relative_position_bias_table"] == str(P())
    assert specs["vision_encoder/layers_3/blocks_0/attn/relative_position_bias_table"] == str(P(None, "tensor"))


@pytest.mark.parametrize("config,n_devices,shape", [
    ({"data": -1}, 8, (8, 1, 1)),
    ({"fsdp": -1}, 8, (1, 8, 1)),
    ({"data": -1, "tensor": 2}, 8, (4, 1, 2)),
    ({"data": 2, "fsdp": -1, "tensor": 2}, 8, (2, 2, 2)),
    ({"fsdp": -1}, 4, (1, 4, 1)),
    ({"tensor": 2}, 2, (1, 1, 2)),
])
def test_mesh_shape_resolution(config, n_devices, shape):
    """-1 takes the devices the fixed axes leave, absent axes are 1, and the mesh holds each device once."""
    devices = jax.devices()[:n_devices]
    mesh = parallel.make_mesh(config, devices)
    assert mesh.axis_names == parallel.MESH_AXES and mesh.devices.shape == shape
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


@pytest.mark.parametrize("cfg,message", [
    ({"data": -1, "fsdp": -1}, "at most one axis"),
    ({"data": 3}, "needs 3 devices"),
    ({"data": -1, "fsdp": 3}, "not divisible"),
])
def test_bad_mesh_config_is_rejected(cfg, message):
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(cfg)


@pytest.fixture(scope="module")
def reference_outputs(tiny_params):
    cfg, params = tiny_params
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    inputs = (jnp.asarray(rng.normal(size=(8, 224, 224, 3)), jnp.float32),
              jnp.asarray(rng.integers(0, 1000, (8, 16)), jnp.int32),
              jnp.asarray(np.concatenate([np.ones((8, 12)), np.zeros((8, 4))], 1), jnp.int32))
    forward = jax.jit(lambda p, *x: model.apply({"params": p}, *x))
    host = jax.tree.map(np.asarray, params)
    return forward, host, inputs, jax.tree.map(np.asarray, forward(host, *inputs))


@pytest.mark.parametrize("mesh_config", [{"data": 4, "tensor": 2}, {"fsdp": 8}])
def test_sharded_forward_equals_single_device(reference_outputs, mesh_config):
    forward, host_params, inputs, expected = reference_outputs
    mesh = parallel.make_mesh(mesh_config)
    shardings = parallel.param_shardings(abstract_params(tiny_model_config()), mesh)
    params = parallel.shard_params(host_params, shardings)
    if mesh_config.get("fsdp") == 8:
        emb = params["text_encoder"]["embeddings"]["word_embeddings"]
        assert emb.sharding.spec == P(None, "fsdp") and len(emb.addressable_shards) == 8
    batch = [jax.device_put(x, parallel.batch_sharding(mesh)) for x in inputs]
    got = forward(params, *batch)
    for key in expected:
        np.testing.assert_allclose(np.asarray(got[key]), expected[key], rtol=0, atol=1e-6,
                                   err_msg=key)  # measured 4.2e-7 (both meshes)


def test_params_are_born_sharded():
    cfg = tiny_model_config()
    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    params, shardings = parallel.init_sharded_params(build_model(cfg), cfg, mesh, jax.random.PRNGKey(0))
    q = params["text_encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]
    assert q.shape == (128, 4, 32) and q.sharding.spec == P("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (32, 2, 32)
    assert jax.tree.structure(params) == jax.tree.structure(shardings)
    leaves = jax.tree.leaves(nn.meta.unbox(params))
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
