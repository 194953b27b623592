"""Ahead-of-time compile of the train steps for a TPU slice or a GPU node, from a CPU machine with no accelerator.

    cclm-jax compile --config configs/cclm_base.py --topology v5p-16 [--mesh.fsdp -1 --mesh.data 1 ...]
        [--set model.dtype=bfloat16 ...] [--kinds image_caption,parallel_text] [--batch-per-chip N]
        [--search-batch [--search-limit N]] [--json out.json] [--dump-hlo DIR]
    (also `python -m cclm_jax.aot` or `python benchmarks/compile_aot.py`; the same options)

For each batch kind it lowers and compiles the jitted, donated, sharded train step exactly as training builds it
(`build_program`: the one function that touches the trainer's APIs), with nothing allocated: the state and the
batch are `jax.ShapeDtypeStruct`s carrying `NamedSharding`s over a mesh of the topology's devices. It reports, per
chip: arguments / temp / outputs / peak memory against the chip's HBM and whether it fits (on TPU the compiler
itself refuses a program over HBM with RESOURCE_EXHAUSTED; that is caught and reported as "does not fit" with the
compiler's numbers), compile seconds, XLA's FLOPs against the analytic count (`cclm_jax.flops`), the collectives of
the compiled program (count, data bytes and ring link bytes per chip by kind, loop trip counts applied) with an
ICI-time lower bound, and the bytes per chip of the parameters and of the optimizer state. `--search-batch` finds
the largest per-chip batch that fits by doubling then bisection (one compile per probe).

Why a module of the package (`cclm-jax compile`) and not only a benchmark script: sizing a run
(does cclm_base at 128 per chip fit a v5p-16? which mesh?) is a user's question before renting a slice, and the
answer must follow the package's own trainer, so it lives with it; `benchmarks/compile_aot.py` is a thin wrapper.

Setup (a separate virtualenv keeps libtpu away from the CPU test environment):
    python3 -m venv venv-tpu && venv-tpu/bin/pip install "jax[tpu]==0.10.2" -e .   # libtpu: 213 MB wheel
    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 venv-tpu/bin/python -m cclm_jax.aot ...
`main` sets both variables when they are unset (JAX_PLATFORMS through `jax.config`, before any backend starts).
GPU nodes (`8xH100`) need the CUDA PJRT plugin (`pip install "jax[cuda12-local]"`, no GPU or driver needed) and a
`GpuTargetConfigProto` text file for `--gpu-target-config` that matches the installed jaxlib.

Units: memory in bytes (GiB = 2^30 in the tables), FLOPs per chip per step, times in seconds (ms in the tables).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from cclm_jax import flops, parallel

GiB = 2 ** 30
GB = 10 ** 9
KINDS = ("image_caption", "parallel_text")

# ----------------------------------------------------------------------------------------------- chips

@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip numbers: `hbm_bytes` (memory one chip's program may use), `peak_flops` (dense bf16
    FLOP/s), `ici_bytes_per_s` (inter-chip bandwidth of one chip, all links, both directions: the most a chip can
    move per second, so bytes / it is a lower bound on communication time), `device_kind` (`jax.Device.device_kind`
    of the compile target) and `cores` (TensorCores per chip: TPU v4/v5p names count cores)."""

    name: str
    hbm_bytes: int
    peak_flops: float
    ici_bytes_per_s: float
    device_kind: str
    cores: int = 1


CHIPS: dict[str, Chip] = {
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, HBM2 32 GiB. ICI: 2,400 Gbps per chip in Google's v5p launch
    # comparison (v5p: 4,800 Gbps), which the v5p page states as 1,200 GB/s bidirectional -> v4: 600 GB/s.
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 600 * GB, "TPU v4", cores=2),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, HBM2 16 GB(iB), bidirectional ICI 400 GB/s per chip.
    # (libtpu's compiler allows 15.75 GiB of it: "exceeds available HBM (15.75G)".)
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 400 * GB, "TPU v5 lite"),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB user-allocatable HBM (96 GiB physical), 2 TensorCores,
    # bidirectional ICI 1,200 GB/s per chip.
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 1200 * GB, "TPU v5", cores=2),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, HBM 32 GB(iB), bidirectional ICI 800 GB/s per chip.
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 800 * GB, "TPU v6 lite"),
    # NVIDIA H100 SXM data sheet: 989.4 TFLOP/s dense bf16, 80 GB HBM3, NVLink 900 GB/s (bidirectional) per GPU.
    "h100": Chip("NVIDIA H100", 80 * GiB, 989.4e12, 900 * GB, "NVIDIA H100 80GB HBM3"),
    # NVIDIA H200 SXM data sheet: 989.4 TFLOP/s dense bf16, 141 GB HBM3e, NVLink 900 GB/s per GPU.
    "h200": Chip("NVIDIA H200", 141 * GB, 989.4e12, 900 * GB, "NVIDIA H200"),
    # NVIDIA A100 SXM 80GB data sheet: 312 TFLOP/s dense bf16, 80 GB HBM2e, NVLink 600 GB/s per GPU.
    "a100": Chip("NVIDIA A100", 80 * GiB, 312e12, 600 * GB, "NVIDIA A100-SXM4-80GB"),
    # This machine's (fake) CPU devices: for tests and debugging the tool itself; no memory limit, no link.
    "cpu": Chip("CPU", 0, 0.0, 0.0, "cpu"),
}

# ------------------------------------------------------------------------------------------- topologies

TPU_2D = ("v5e", "v6e")  # `-N` counts chips; 2D torus; libtpu names `v5e:AxB`
TPU_3D = ("v4", "v5p")  # `-N` counts TensorCores (2 per chip); 3D torus; libtpu names `v5p:AxBxC`
GPUS = ("h100", "h200", "a100")


class TopologyError(ValueError):
    """A topology name that cannot be compiled for (the message is one line and says what would work)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A compile target: `chip` (a key of `CHIPS`), `num_chips`, `platform` ('tpu', 'cuda' or 'cpu'), the
    name `get_topology_desc` takes (`topology_name`, e.g. 'v5p:2x2x2'; `shape` is its chip grid) and
    `chip_config_name` ('megacore' for v4: one device per chip, as the slices are used)."""

    name: str
    chip: str
    num_chips: int
    platform: str
    topology_name: str = ""
    shape: tuple[int, ...] = ()
    chip_config_name: str = ""

    @property
    def spec(self) -> Chip:
        return CHIPS[self.chip]


def _grow(shape: list[int]) -> list[int]:
    """The next slice of a power-of-two family: double the last of the smallest dimensions (2x2x1 -> 2x2x2 ->
    2x2x4 -> 2x4x4 -> 4x4x4 -> 4x4x8; 2x2 -> 2x4 -> 4x4 -> 4x8), as the Cloud TPU slice tables grow."""
    smallest = min(shape)
    i = max(j for j, d in enumerate(shape) if d == smallest)
    return shape[:i] + [shape[i] * 2] + shape[i + 1:]


def _slice_table() -> dict[str, tuple[int, ...]]:
    """`v5p-16` -> (2, 2, 2) etc.: the single-slice names of v4 and v5p (cores 8 .. 8192, chips = cores / 2)
    and of v5e and v6e (chips 1, 4 .. 256)."""
    table: dict[str, tuple[int, ...]] = {}
    for gen in TPU_3D:
        shape = [2, 2, 1]
        while math.prod(shape) <= 4096:
            table[f"{gen}-{2 * math.prod(shape)}"] = tuple(shape)
            shape = _grow(shape)
    for gen in TPU_2D:
        table[f"{gen}-1"] = (1, 1)
        shape = [2, 2]
        while math.prod(shape) <= 256:
            table[f"{gen}-{math.prod(shape)}"] = tuple(shape)
            shape = _grow(shape)
    return table


SLICES = _slice_table()


def _valid_names() -> str:
    by_gen: dict[str, list[str]] = {}
    for name in SLICES:
        gen, n = name.split("-")
        by_gen.setdefault(gen, []).append(n)
    slices = "; ".join(f"{gen}-{{{','.join(ns)}}}" for gen, ns in by_gen.items())
    return (f"{slices}; or a libtpu name like v5p:2x2x2, v4:2x2x4, v5e:4x4, v6e:8x8; or a GPU node like 8xH100, "
            f"8xH200, 8xA100; or cpu[:N] (this machine's devices)")


def parse_topology(name: str) -> Topology:
    """A `Topology` from `v5p-16` (a Cloud TPU slice name), `v5p:2x2x2` (a libtpu topology name), `8xH100` /
    `H100x8` (a GPU node) or `cpu` / `cpu:8` (this machine's devices). Raises `TopologyError` listing the valid
    forms for anything else. Nothing is loaded: the name table alone."""
    raw = name
    name = name.strip().lower()
    if name in SLICES:
        gen = name.split("-")[0]
        shape = SLICES[name]
        return Topology(raw, gen, math.prod(shape), "tpu", f"{gen}:{'x'.join(map(str, shape))}", shape,
                        "megacore" if gen == "v4" else "")
    match = re.fullmatch(r"(v4|v5p|v5e|v6e|v5):(\d+(?:x\d+)*)", name)
    if match:
        gen = "v5p" if match.group(1) == "v5" else match.group(1)
        shape = tuple(int(d) for d in match.group(2).split("x"))
        if len(shape) != (3 if gen in TPU_3D else 2) or min(shape) < 1:
            raise TopologyError(f"topology {raw!r}: {gen} takes {'AxBxC' if gen in TPU_3D else 'AxB'} chips; "
                                f"valid: {_valid_names()}")
        return Topology(raw, gen, math.prod(shape), "tpu", f"{gen}:{match.group(2)}", shape,
                        "megacore" if gen == "v4" else "")
    match = re.fullmatch(r"(\d+)x(h100|h200|a100)|(h100|h200|a100)(?:x|-)(\d+)", name)
    if match:
        n = int(match.group(1) or match.group(4))
        chip = match.group(2) or match.group(3)
        if n < 1 or n > 8:
            raise TopologyError(f"topology {raw!r}: a GPU node has 1 to 8 GPUs; valid: {_valid_names()}")
        return Topology(raw, chip, n, "cuda", chip, (1, 1, n))
    match = re.fullmatch(r"cpu(?::(\d+))?", name)
    if match:
        n = int(match.group(1)) if match.group(1) else 0  # 0: all local CPU devices
        return Topology(raw, "cpu", n, "cpu")
    raise TopologyError(f"unknown topology {raw!r}; valid: {_valid_names()}")


def topology_devices(topology: Topology, gpu_target_config: str | None = None) -> list[jax.Device]:
    """The devices to build the mesh from: a libtpu or CUDA `TopologyDescription`'s devices (compile-only,
    never executed) or this machine's CPU devices. One-line `TopologyError`s say what to install."""
    from jax.experimental import topologies

    if topology.platform == "cpu":
        devices = jax.devices("cpu")
        n = topology.num_chips or len(devices)
        if n > len(devices):
            raise TopologyError(f"topology {topology.name!r}: {len(devices)} CPU devices here; set "
                                f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
        return devices[:n]
    if topology.platform == "tpu":
        if importlib.util.find_spec("libtpu") is None:
            raise TopologyError(f"topology {topology.name!r} needs libtpu: pip install 'jax[tpu]=={jax.__version__}' "
                                "(a separate venv is best; then JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1)")
        kwargs = {"chip_config_name": topology.chip_config_name} if topology.chip_config_name else {}
        desc = topologies.get_topology_desc(topology_name=topology.topology_name, platform="tpu", **kwargs)
        return list(desc.devices)
    if not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        raise TopologyError(f"topology {topology.name!r} needs the CUDA PJRT plugin (no GPU or driver needed): "
                            f"pip install 'jax[cuda12-local]=={jax.__version__}'")
    if not gpu_target_config:
        raise TopologyError(f"topology {topology.name!r} needs --gpu-target-config FILE: a GpuTargetConfigProto text "
                            "for this GPU matching the installed jaxlib (XLA keeps them as gpu_specs/*.txtpb)")
    with open(gpu_target_config) as f:
        target = f.read()
    desc = topologies.get_topology_desc(topology_name=topology.topology_name, platform="cuda", target_config=target,
                                        topology="x".join(map(str, topology.shape)))
    return list(desc.devices)


# ----------------------------------------------------------------------------------------- collectives

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")


def shape_bytes(text: str) -> int:
    """Bytes of every array shape in an HLO type string (`f32[8,128]{1,0}`, tuples summed)."""
    return sum(_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x) for d, dims in _SHAPE.findall(text))


def group_size(attrs: str, num_devices: int) -> int:
    """Devices in one replica group: `replica_groups={{0,1},{2,3}}`, the iota form `[2,4]<=[8]`, the mesh form
    `mesh['a'=4,'b'=2] {'a'}`, or `source_target_pairs` (2); all devices when the groups are empty."""
    if "source_target_pairs=" in attrs:
        return 2
    match = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if match:
        sizes = {k.strip("' "): int(v) for k, v in (kv.split("=") for kv in match.group(1).split(","))}
        return math.prod(sizes[a.strip("' ")] for a in match.group(2).split(",") if a.strip())
    match = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if match:
        return int(match.group(2))
    match = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if match:
        return len([x for x in match.group(1).split(",") if x.strip()])
    return num_devices


def _trip_count(while_attrs: str, condition: list[str]) -> int | None:
    """A while loop's trip count: XLA's `known_trip_count`, else a condition `compare(i, constant(N)),
    direction=LT` (a scan from 0 by 1, as `jax.lax.scan` lowers); None when neither is there."""
    match = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_attrs)
    if match:
        return int(match.group(1))
    constants = {}
    for line in condition:
        m = _INSTR.match(line)
        if m and m.group(3) == "constant":
            c = re.match(r"\s*(-?\d+)\)", m.group(4))
            if c:
                constants[m.group(1)] = int(c.group(1))
    for line in condition:
        if "compare(" in line and "direction=LT" in line:
            for name in re.findall(r"%([\w.\-]+)", line.split("compare(", 1)[1].split(")", 1)[0]):
                if name in constants:
                    return constants[name]
    return None


def collective_inventory(hlo_text: str, num_devices: int) -> dict[str, Any]:
    """Collectives of a compiled (SPMD-partitioned, per-device) HLO module (`compiled.as_text()`), per chip.

    Returns `{kind: {"count", "bytes", "link_bytes"}, ..., "unknown_trip_counts": n}` for each kind of `COLLECTIVES`
    (async `-start` ops counted, `-done` not). `bytes` is the collective's data per chip: the gathered result of an
    all-gather, the operand of the others. `link_bytes` is what one chip sends over its links in a ring algorithm
    of group size n: all-gather (n-1)/n x result, reduce-scatter and all-to-all (n-1)/n x operand, all-reduce
    2 (n-1)/n x operand, collective-permute the operand. Ops in a while body count once per iteration (see
    `_trip_count`; a loop whose count is unknown counts once and is added to `unknown_trip_counts`). The TPU's
    all-reduce-scatter fusion (an all-reduce inside a computation named `all-reduce-scatter*`) is a reduce-scatter.
    """
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        match = _COMP.match(line)
        if match:
            current = match.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None:
            if line.startswith("}"):
                current = None
            else:
                computations[current].append(line)
    shapes: dict[str, str] = {}
    for body in computations.values():
        for line in body:
            match = _INSTR.match(line)
            if match:
                shapes[match.group(1)] = match.group(2)

    # How many times each computation runs per step: while bodies x trip count, other callees x 1.
    multiplicity: dict[str, int] = {}
    unknown = 0

    def visit(name: str, times: int) -> None:
        nonlocal unknown
        multiplicity[name] = multiplicity.get(name, 0) + times
        for line in computations.get(name, ()):
            body = re.search(r"\bbody=%?([\w.\-]+)", line)
            if body and " while(" in line:
                condition = re.search(r"\bcondition=%?([\w.\-]+)", line)
                trips = _trip_count(line, computations.get(condition.group(1), []) if condition else [])
                if trips is None:
                    unknown += 1
                visit(body.group(1), times * (trips or 1))
                continue
            for callee in re.findall(r"\b(?:calls|to_apply|branch_computations|called_computations)="
                                     r"\{?%?([\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?", line):
                for c in callee.split(","):
                    c = c.strip().lstrip("%")
                    if c in computations and c != name:
                        visit(c, times)

    if entry is None:
        raise ValueError("collective_inventory: no ENTRY computation in the HLO text")
    visit(entry, 1)
    out: dict[str, Any] = {k: {"count": 0, "bytes": 0, "link_bytes": 0.0} for k in COLLECTIVES}
    for comp, times in multiplicity.items():
        for line in computations[comp]:
            match = _INSTR.match(line)
            if not match:
                continue
            op = match.group(3)
            kind = op.removesuffix("-start")
            if kind not in COLLECTIVES or op.endswith("-done"):
                continue
            if kind == "all-reduce" and comp.startswith("all-reduce-scatter"):
                kind = "reduce-scatter"
            operands = re.findall(r"%([\w.\-]+)", match.group(4).split(")", 1)[0])
            operand_bytes = sum(shape_bytes(shapes.get(o, "")) for o in operands)
            n = max(group_size(match.group(4), num_devices), 1)
            if kind == "all-gather":
                data = operand_bytes * n
                link = operand_bytes * (n - 1)
            elif kind == "all-reduce":
                data, link = operand_bytes, 2 * operand_bytes * (n - 1) / n
            elif kind == "collective-permute":
                data, link = operand_bytes, float(operand_bytes)
            else:
                data, link = operand_bytes, operand_bytes * (n - 1) / n
            entry_ = out[kind]
            entry_["count"] += times
            entry_["bytes"] += times * data
            entry_["link_bytes"] += times * link
    out["unknown_trip_counts"] = unknown
    return out


# --------------------------------------------------------------------------------------------- search

def largest_fitting(fits: Callable[[int], bool], start: int = 1, limit: int = 1 << 14) -> int:
    """The largest n in [1, limit] with `fits(n)`, assuming fitting is monotone (n fits => n - 1 fits): doubling
    from `start` until one does not fit, then bisection. 0 when `start` (and every smaller n) does not fit.
    Calls `fits` O(log n) times (each call is one compile)."""
    lo, hi = 0, None  # lo fits (0 trivially); hi does not
    n = max(1, min(start, limit))
    while hi is None:
        if fits(n):
            lo = n
            if n >= limit:
                return n
            n = min(2 * n, limit)
        else:
            hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


# ------------------------------------------------------------------------------------------ the program

@dataclasses.dataclass
class Program:
    """What training compiles: `state` (the TrainState as ShapeDtypeStructs with the trainer's shardings),
    `steps` (jitted, donated steps keyed by step name: the batch kinds in 'alternate' mode, 'joint' in 'joint'
    mode) and the mesh."""

    mesh: jax.sharding.Mesh
    state: Any
    steps: dict[str, Any]


def build_program(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Program:
    """The train state and steps as the trainer builds them (`train.trainer.make_state`: parameters by their
    logical axes, AdamW moments like their parameters), from abstract values only.

    The one place that touches the trainer's APIs (`trainer.make_state`, `make_train_steps`).
    """
    from cclm_jax.interop.shapes import abstract_params
    from cclm_jax.optimizer import make_optimizer
    from cclm_jax.train import trainer
    from cclm_jax.train.steps import StepConfig, make_train_steps, updates_per_cycle

    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=parallel.replicated(mesh))
    state, state_shardings, optimizer = trainer.make_state(
        abstract_params(config.model, "pretrain"),
        lambda p: make_optimizer(config.optimizer, config.schedule, p, updates_per_cycle(config)), mesh, rng)
    step_config = StepConfig(config.model, config.objectives, mesh, config.train.dropout)
    steps = make_train_steps(step_config, optimizer, config.train.mode, state_shardings,
                             parallel.batch_sharding(mesh))
    return Program(mesh, state, steps)


def abstract_batch(config: ml_collections.ConfigDict, kind: str, global_batch: int,
                   sharding: NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of one batch of `kind` at the config's padded shapes, sharded like training's batches:
    int32 `text_ids`, `text_atts`, `text_ids_masked` [B, L], `masked_pos`, `masked_ids` [B, masks]; float32
    normalised `image` [B, res, res, 3] (image_caption) or `text_ids_2`, `text_atts_2` [B, L] (parallel_text)."""
    shapes = flops.run_config_shapes(config)[kind]
    b, length, masks = global_batch, shapes.tokens, shapes.masks

    def s(shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    out = {"text_ids": s((b, length)), "text_atts": s((b, length)), "text_ids_masked": s((b, length)),
           "masked_pos": s((b, masks)), "masked_ids": s((b, masks))}
    if kind == "image_caption":
        res = config.model.vision.image_res
        out["image"] = s((b, res, res, 3), jnp.float32)
    else:
        out["text_ids_2"], out["text_atts_2"] = s((b, length)), s((b, length))
    return out


def step_inputs(config: ml_collections.ConfigDict, step: str, global_batch: int, mesh) -> dict[str, Any]:
    """The `batches` argument of a step: `{kind: batch}`, or both kinds for the 'joint' step."""
    kinds = KINDS if step == "joint" else (step,)
    return {k: abstract_batch(config, k, global_batch, parallel.batch_sharding(mesh)) for k in kinds}


# ------------------------------------------------------------------------------------------- reporting

def state_bytes_per_chip(state: Any) -> dict[str, float]:
    """Bytes one chip holds of each part of a TrainState of ShapeDtypeStructs with shardings: `params`,
    `opt_state`, `other` (step, rng, counters); the global (unsharded) sizes `params_global` and
    `opt_state_global`; and `opt_state_undersharded`: the per-chip bytes of optimizer leaves (AdamW moments) split
    over fewer chips than their parameter (e.g. replicated moments of an FSDP-sharded parameter; 0 when every
    moment has its parameter's sharding). An optimizer leaf belongs to the parameter whose path ends its own."""
    def per_chip_elements(x) -> int:
        shard = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        return math.prod(shard)

    def total(tree, elements) -> int:
        return int(sum(elements(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))

    def dict_keys(path) -> tuple[str, ...]:
        keys = []
        for entry in reversed(path):
            if not isinstance(entry, jax.tree_util.DictKey):
                break
            keys.append(str(entry.key))
        return tuple(reversed(keys))

    param_elements = {dict_keys(p): (x.shape, per_chip_elements(x))
                      for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    undersharded = 0
    for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state):
        keys = dict_keys(path)
        match = next((param_elements[keys[i:]] for i in range(len(keys)) if keys[i:] in param_elements), None)
        if match is not None and match[0] == x.shape and per_chip_elements(x) > match[1]:
            undersharded += per_chip_elements(x) * np.dtype(x.dtype).itemsize
    whole = lambda x: math.prod(x.shape)  # noqa: E731
    return {"params": total(state.params, per_chip_elements), "opt_state": total(state.opt_state, per_chip_elements),
            "other": total([state.step, state.rng, state.nonfinite], per_chip_elements),
            "params_global": total(state.params, whole), "opt_state_global": total(state.opt_state, whole),
            "opt_state_undersharded": undersharded}


# libtpu 0.0.42: "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries
# (357.69G) exceeds available HBM (15.75G)."; older ones: "Used 120.5G of 95.74G hbm".
_OOM_NUMBERS = (re.compile(r"required[^(]*\(([\d.]+[KMGT]?)\) exceeds available HBM \(([\d.]+[KMGT]?)\)",
                           re.IGNORECASE),
                re.compile(r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm", re.IGNORECASE))


def compile_step(fn, args: tuple, chip: Chip, platform: str, num_devices: int,
                 dump_hlo: str | None = None) -> dict[str, Any]:
    """Lower and compile one jitted step for abstract `args`; a dict of per-chip numbers (see the module doc).

    On TPU, `fits` is the compiler's verdict (RESOURCE_EXHAUSTED -> False, with `error` holding the compiler's
    "Used X of Y hbm" numbers); elsewhere it is peak <= the chip's HBM (None on CPU: no limit to compare with).
    Errors other than running out of memory are raised. `dump_hlo`: write the compiled HLO text to this path."""
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 (XlaRuntimeError's module moves between jaxlib versions)
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        message = str(e)
        numbers = next((m for m in (p.search(message) for p in _OOM_NUMBERS) if m), None)
        head = next((line.strip() for line in message.splitlines() if "RESOURCE_EXHAUSTED" in line), message[:300])
        return {"fits": False, "lower_s": t1 - t0, "compile_s": time.perf_counter() - t1,
                "required": numbers.group(1) if numbers else None, "available": numbers.group(2) if numbers else None,
                "error": head[:400]}
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    # Live bytes: arguments + outputs - donated (aliased) + temp; XLA's own peak where the backend reports one
    # (TPU does, and may report temp 0 with a larger peak): the larger of the two.
    live = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    xla_peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    peak = max(live, xla_peak)
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    hlo = compiled.as_text()
    if dump_hlo:
        with open(dump_hlo, "w") as f:
            f.write(hlo)
    inventory = collective_inventory(hlo, num_devices)
    link = sum(v["link_bytes"] for k, v in inventory.items() if k in COLLECTIVES)
    if platform == "tpu":
        fits = True
    elif chip.hbm_bytes:
        fits = peak <= chip.hbm_bytes
    else:
        fits = None
    return {"fits": fits, "lower_s": t1 - t0, "compile_s": t2 - t1,
            "argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
            "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
            "code_bytes": m.generated_code_size_in_bytes, "live_bytes": live, "xla_peak_bytes": xla_peak,
            "peak_bytes": peak,
            "xla_flops": float(cost.get("flops", 0.0)), "collectives": inventory,
            "ici_s_lower_bound": link / chip.ici_bytes_per_s if chip.ici_bytes_per_s else None,
            "compute_s_lower_bound": float(cost.get("flops", 0.0)) / chip.peak_flops if chip.peak_flops else None}


def analytic_flops_per_chip(config: ml_collections.ConfigDict, step: str, global_batch: int, chips: int) -> float:
    """`cclm_jax.flops.model_flops` (3 x forward, per example) x the global batch / chips, summed over the kinds
    the step trains."""
    shapes = flops.run_config_shapes(config)
    kinds = KINDS if step == "joint" else (step,)
    return sum(flops.model_flops(config.model, k, shapes[k]) for k in kinds) * global_batch / chips


# ---------------------------------------------------------------------------------------------- config

def parse_value(text: str) -> Any:
    """A Python literal (numbers, booleans, tuples, ...) or, failing that, the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """A copy of `config` with each `dotted.key=value` set; an unknown key is a one-line error naming it."""
    config = ml_collections.ConfigDict(config.to_dict())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r} must look like dotted.key=value")
        *parents, name = key.strip().split(".")
        node = config
        for part in parents:
            if part not in node:
                raise KeyError(f"--set {item!r}: config has no section {part!r}")
            node = node[part]
        if name not in node:
            raise KeyError(f"--set {item!r}: config has no key {key!r}")
        node[name] = parse_value(value.strip())
    return config


def load_config(spec: str, overrides: Sequence[str], mesh: Mapping[str, int]) -> ml_collections.ConfigDict:
    """`path.py[:arg]` -> get_config(arg), `--set` overrides, `--mesh.X` sizes; a vocabulary left to the
    tokenizer (-1) becomes the demo tokenizer's size (nothing is read from disk)."""
    from cclm_jax.run_config import load_config_file

    path, _, arg = spec.partition(":")
    config = load_config_file(path, arg)
    text = config.model.text
    if text.vocab_size == -1:
        text.vocab_size = config.data.demo.vocab_size
        text.mask_token_id = text.vocab_size - 1
    config = apply_overrides(config, overrides)
    if mesh:  # --mesh.X replaces the config's mesh; axes not given are 1
        config.mesh = {axis: int(mesh.get(axis, 1)) for axis in parallel.MESH_AXES}
    return config


# -------------------------------------------------------------------------------------------------- run

def run(config: ml_collections.ConfigDict, topology: Topology, devices: Sequence[jax.Device],
        kinds: Sequence[str] | None = None, batch_per_chip: int | None = None, search_batch: bool = False,
        dump_hlo: str | None = None, search_limit: int = 1 << 14,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Compile every requested step for `devices`; the report dict (`steps`: one entry per step; `state`: bytes
    per chip; `search`: the largest per-chip batch per step up to `search_limit` when `search_batch`, starting
    from the first pass's batch). `dump_hlo`: a folder for the
    compiled HLO texts (`<step>_b<global batch>.hlo.txt`)."""
    # A persistent compilation cache (the tests set one) cannot load executables built for a topology's devices:
    # compile those without it.
    cache = jax.config.jax_enable_compilation_cache
    if topology.platform != "cpu":
        jax.config.update("jax_enable_compilation_cache", False)
    try:
        return _run(config, topology, devices, kinds, batch_per_chip, search_batch, dump_hlo, search_limit, log)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)


def _run(config, topology, devices, kinds, batch_per_chip, search_batch, dump_hlo, search_limit, log):
    chips = len(devices)
    mesh = parallel.make_mesh(config.mesh, devices)
    t0 = time.perf_counter()
    program = build_program(config, mesh)
    log(f"state built in {time.perf_counter() - t0:.1f}s on mesh {dict(mesh.shape)}")
    names = list(program.steps)
    if kinds:
        unknown = [k for k in kinds if k not in program.steps]
        if unknown:
            raise ValueError(f"--kinds {unknown}: this config's train.mode={config.train.mode!r} has steps {names}")
        names = list(kinds)
    shards = parallel.num_batch_shards(mesh)
    chip = topology.spec

    def batch_of(step: str, per_chip: int | None) -> int:
        if per_chip is not None:
            return per_chip * chips
        kinds_ = KINDS if step == "joint" else (step,)
        global_batch = max(config.data[k].batch_size for k in kinds_)  # the config's per-host batch, read as global
        return max(shards, global_batch // shards * shards)

    def one(step: str, global_batch: int) -> dict[str, Any]:
        args = (program.state, step_inputs(config, step, global_batch, mesh))
        path = os.path.join(dump_hlo, f"{step}_b{global_batch}.hlo.txt") if dump_hlo else None
        row = compile_step(program.steps[step], args, chip, topology.platform, chips, path)
        row.update(step=step, global_batch=global_batch, batch_per_chip=global_batch / chips,
                   analytic_flops=analytic_flops_per_chip(config, step, global_batch, chips))
        log(f"{step}: batch {global_batch} ({global_batch / chips:g}/chip): compile {row['compile_s']:.1f}s, "
            + (f"peak {row['peak_bytes'] / GiB:.3f} GiB/chip" if "peak_bytes" in row else row.get("error", ""))
            + f", fits {row['fits']}")
        return row

    report: dict[str, Any] = {
        "topology": topology.name, "topology_name": topology.topology_name, "platform": topology.platform,
        "chip": dataclasses.asdict(chip), "chips": chips, "mesh": dict(mesh.shape), "jax": jax.__version__,
        "dtype": config.model.dtype, "state": state_bytes_per_chip(program.state), "steps": [], "search": {}}
    for step in names:
        report["steps"].append(one(step, batch_of(step, batch_per_chip)))
    if search_batch:
        for first in report["steps"]:
            step = first["step"]
            probes: dict[int, dict[str, Any]] = {}
            if first["global_batch"] % chips == 0:  # the first pass is the search's first probe
                probes[first["global_batch"] // chips] = first

            def fits(n: int, step=step, probes=probes) -> bool:
                if n not in probes:
                    probes[n] = one(step, n * chips)
                return probes[n]["fits"] is not False

            start = max(1, first["global_batch"] // chips)
            best = largest_fitting(fits, start=start, limit=max(search_limit, start))
            report["search"][step] = {"largest_batch_per_chip": best,
                                      "probes": {n: {"fits": r["fits"], "peak_bytes": r.get("peak_bytes"),
                                                     "compile_s": r["compile_s"]} for n, r in sorted(probes.items())}}
            log(f"{step}: largest per-chip batch that fits: {best}")
    return report


def _gib(x: float | None) -> str:
    return "—" if x is None else f"{x / GiB:.3f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a state line, one row per step, a collectives table, the batch search."""
    chip, st = report["chip"], report["state"]
    lines = [f"{report['topology']} ({report['topology_name'] or report['platform']}, {report['chips']} x "
             f"{chip['name']}, HBM {_gib(chip['hbm_bytes'] or None)} GiB/chip), mesh {report['mesh']}, dtype "
             f"{report['dtype']}, jax {report['jax']}",
             "",
             f"State per chip: params {_gib(st['params'])} GiB (of {_gib(st['params_global'])} GiB), opt_state "
             f"{_gib(st['opt_state'])} GiB (of {_gib(st['opt_state_global'])} GiB; "
             f"{_gib(st['opt_state_undersharded'])} GiB/chip of it sharded less than its parameter), other "
             f"{_gib(st['other'])} GiB",
             "",
             "| step | batch/chip | global | compile s | args GiB | temp GiB | out GiB | peak GiB | HBM % | fits | "
             "XLA GFLOP/chip | analytic GFLOP/chip | XLA/analytic | compute ms ≥ | ICI ms ≥ |",
             "|" + "---|" * 15]
    for r in report["steps"]:
        if "peak_bytes" not in r:
            lines.append(f"| {r['step']} | {r['batch_per_chip']:g} | {r['global_batch']} | "
                         f"{r['compile_s']:.1f} | — | — | — | {r['required'] or '?'} (compiler's G) | — | "
                         f"**no** (of {r['available'] or '?'}) | — | {r['analytic_flops'] / 1e9:,.1f} | "
                         "— | — | — |")
            continue
        hbm = f"{100 * r['peak_bytes'] / chip['hbm_bytes']:.1f}" if chip["hbm_bytes"] else "—"
        ratio = f"{r['xla_flops'] / r['analytic_flops']:.3f}" if r["xla_flops"] and r["analytic_flops"] else "—"
        ms = lambda s: "—" if s is None else f"{1e3 * s:.3f}"  # noqa: E731
        fits = {True: "yes", False: "**no**", None: "—"}[r["fits"]]
        lines.append(f"| {r['step']} | {r['batch_per_chip']:g} | {r['global_batch']} | {r['compile_s']:.1f} | "
                     f"{_gib(r['argument_bytes'])} | {_gib(r['temp_bytes'])} | {_gib(r['output_bytes'])} | "
                     f"{_gib(r['peak_bytes'])} | {hbm} | {fits} | {r['xla_flops'] / 1e9:,.1f} | "
                     f"{r['analytic_flops'] / 1e9:,.1f} | {ratio} | {ms(r['compute_s_lower_bound'])} | "
                     f"{ms(r['ici_s_lower_bound'])} |")
    compiled = [r for r in report["steps"] if "collectives" in r]
    if compiled:
        lines += ["", "Collectives per chip per step (count / data MiB / ring link MiB):", "",
                  "| step | " + " | ".join(COLLECTIVES) + " |", "|" + "---|" * (len(COLLECTIVES) + 1)]
        for r in compiled:
            c = r["collectives"]
            cells = [f"{c[k]['count']} / {c[k]['bytes'] / 2 ** 20:,.2f} / {c[k]['link_bytes'] / 2 ** 20:,.2f}"
                     for k in COLLECTIVES]
            note = f" ({c['unknown_trip_counts']} loops of unknown trip count counted once)" \
                if c["unknown_trip_counts"] else ""
            lines.append(f"| {r['step']}{note} | " + " | ".join(cells) + " |")
    for step, s in report["search"].items():
        probes = ", ".join(f"{n}: {'fits' if p['fits'] is not False else 'no'}" for n, p in s["probes"].items())
        lines += ["", f"{step}: largest per-chip batch that fits: **{s['largest_batch_per_chip']}** ({probes})"]
    return "\n".join(lines)


def _default_env() -> None:
    """Compile-only defaults: the CPU as the (only) backend, and libtpu loadable by several processes at once."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="cclm-jax compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="path/to/config.py[:arg]")
    parser.add_argument("--topology", required=True, help="v5p-16, v5e:2x2, 8xH100, cpu:8, ...")
    for axis in parallel.MESH_AXES:
        parser.add_argument(f"--mesh.{axis}", type=int, dest=f"mesh_{axis}", default=None,
                            help=f"mesh size of '{axis}' (-1: the remaining devices); any --mesh.X replaces the "
                                 "config's mesh, axes not given are 1")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--kinds", default="", help="steps to compile (default: all of train.mode's)")
    parser.add_argument("--batch-per-chip", type=int, default=None,
                        help="examples per chip (global batch = this x chips); default: the config's batch size")
    parser.add_argument("--search-batch", action="store_true", help="find the largest per-chip batch that fits")
    parser.add_argument("--search-limit", type=int, default=1 << 14, help="largest per-chip batch to try")
    parser.add_argument("--gpu-target-config", default=None, help="GpuTargetConfigProto text file (GPU nodes)")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--dump-hlo", default=None, metavar="DIR", help="write each compiled HLO text here")
    args = parser.parse_args(argv)
    try:
        topology = parse_topology(args.topology)
    except TopologyError as e:
        parser.error(str(e))
    _default_env()
    mesh = {a: getattr(args, f"mesh_{a}") for a in parallel.MESH_AXES if getattr(args, f"mesh_{a}") is not None}
    config = load_config(args.config, args.set, mesh)
    try:
        devices = topology_devices(topology, args.gpu_target_config)
    except TopologyError as e:
        print(f"cclm-jax compile: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    kinds = [k for k in args.kinds.split(",") if k]
    if args.dump_hlo:
        os.makedirs(args.dump_hlo, exist_ok=True)
    report = run(config, topology, devices, kinds, args.batch_per_chip, args.search_batch, args.dump_hlo,
                 args.search_limit, log=lambda s: print(s, file=sys.stderr, flush=True))
    report["command"] = "cclm-jax compile " + " ".join(argv if argv is not None else sys.argv[1:])
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return report


if __name__ == "__main__":
    main()
