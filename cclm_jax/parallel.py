"""Meshes, logical-axis rules and shardings (GSPMD style: declared once, `jit` does the rest).

Model code names every parameter dimension with a logical axis (`embed`, `heads`, `mlp`, `vocab`, `norm`);
`LOGICAL_RULES` maps logical axes onto the mesh axes `data`, `fsdp`, `tensor`. Pure data parallelism,
FSDP and tensor parallelism are therefore one config change (`config.mesh`):

- data parallel: `{data: -1}`; every parameter replicated, batches split over `data`.
- FSDP: `{fsdp: -1}`; parameters sharded over `fsdp` along their `embed` dim (the 250002x1024 word
  embedding included), batches split over `data` x `fsdp`.
- tensor parallel: `{tensor: k}`; attention heads, MLP hidden units and the vocabulary split over `tensor`.

A mesh axis is dropped from a dimension it does not divide (e.g. 1 Swin head over 2 tensor shards), so
every config works on every mesh, at worst replicating that one parameter.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
)


def mesh_shape(mesh_config: Mapping[str, int], n_devices: int) -> tuple[int, int, int]:
    """Resolve `{data, fsdp, tensor}` sizes (one of them may be -1 = the remaining devices)."""
    sizes = [int(mesh_config.get(name, 1)) for name in MESH_AXES]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if unknown:
        if n_devices % known:
            raise ValueError(f"config.mesh: {n_devices} devices are not divisible by the fixed axes "
                             f"({known}) of {dict(zip(MESH_AXES, sizes))}")
        sizes[unknown[0]] = n_devices // known
    if int(np.prod(sizes)) != n_devices:
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"{n_devices} are available")
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (GSPMD propagation)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def _mesh_axes_of(logical: str | None, rules: Mapping[str, Any]) -> tuple[str, ...]:
    if logical is None:
        return ()
    target = rules.get(logical)
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_to_mesh_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                         rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec for one array: each dim gets the mesh axes its logical name maps to, keeping only
    axes of size > 1 that divide the dim and are not already used by an earlier dim."""
    rules = dict(rules)
    used: set[str] = set()
    spec = []
    for logical, size in zip(logical_axes, shape):
        chosen, divisor = [], 1
        for axis in _mesh_axes_of(logical, rules):
            n = mesh.shape[axis]
            if n > 1 and axis not in used and size % (divisor * n) == 0:
                chosen.append(axis)
                divisor *= n
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def param_shardings(abstract_params, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES):
    """NamedShardings for a tree of boxed (`nn.LogicallyPartitioned`) abstract parameters."""
    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            spec = logical_to_mesh_spec(leaf.names, leaf.value.shape, mesh, rules)
        else:
            spec = PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def partition_specs(abstract_params, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES):
    """PartitionSpecs of every parameter (for golden dumps and logging)."""
    return jax.tree.map(lambda s: s.spec, param_shardings(abstract_params, mesh, rules))


def init_sharded_params(model: nn.Module, model_config: ml_collections.ConfigDict, mesh: Mesh,
                        rng: jax.Array):
    """Initialise parameters directly in their shardings (never materialised on one device)."""
    res = model_config.vision.image_res
    image = jnp.zeros((1, res, res, 3), jnp.float32)
    ids = jnp.zeros((1, 8), jnp.int32)

    def init(key):
        return nn.meta.unbox(model.init(key, image, ids, ids)["params"])

    abstract = jax.eval_shape(lambda key: model.init(key, image, ids, ids)["params"], rng)
    shardings = param_shardings(abstract, mesh)
    return jax.jit(init, out_shardings=shardings)(rng), shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: the leading (example) dim over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def num_batch_shards(mesh: Mesh) -> int:
    """How many ways a batch is split (data x fsdp)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-host numpy batch -> global jax.Arrays sharded over the batch axes (multi-host safe)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def shard_params(params, shardings):
    """Place an (unsharded, host) parameter tree onto `shardings` (e.g. after a checkpoint import)."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)


def state_shardings(abstract_state: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of a whole train state: every leaf of the optimizer state that mirrors a parameter (AdamW's
    `mu` and `nu`, whose key paths end with the parameter's path and have its shape) gets that parameter's
    sharding; counters, keys and scalars are replicated. Without this, FSDP shards the parameters but
    `jnp.zeros_like` leaves every Adam moment replicated on each chip."""
    flat_params = jax.tree_util.tree_flatten_with_path(params_shardings)[0]
    by_path = {tuple(path): sharding for path, sharding in flat_params}
    lengths = sorted({len(path) for path in by_path}, reverse=True)
    params_shapes = {tuple(path): leaf.shape
                     for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]}

    def one(path, leaf):
        path = tuple(path)
        for n in lengths:
            suffix = path[-n:]
            if len(path) >= n and suffix in by_path and params_shapes.get(suffix) == leaf.shape:
                return by_path[suffix]
        return replicated(mesh)

    rest = jax.tree_util.tree_map_with_path(one, abstract_state.replace(params=None))
    return rest.replace(params=params_shardings)
