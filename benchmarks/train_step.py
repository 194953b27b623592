"""Train-step benchmark: compile time, step time, examples/s, model FLOP/s, MFU and compiled memory per batch kind.

    python benchmarks/train_step.py --config configs/tiny.py [--set model.dtype=bfloat16 ...] [--batch 8]
        [--steps 5] [--kinds image_caption,parallel_text]
        [--variant kv_cache:model.cache_cross_kv=True --variant ...] [--label NAME] [--results benchmarks/RESULTS.md]
        [--json out.json]

Every arm (the baseline, then each `--variant NAME:key=value,key=value` applied on top of it) builds the model,
optimizer and `TrainState` the way the training loop does (`parallel.init_sharded_params`, `make_optimizer`,
`steps.make_train_steps` in 'alternate' mode: the donated, sharded, jitted update of each batch kind) and, for
each kind, lowers and compiles the step ahead of time (wall seconds for each, and the process CPU seconds of
both, which a busy shared machine disturbs less), reading `memory_analysis()` and XLA's `cost_analysis()`.
Then all arms are timed together: 2 warm-up rounds and `--steps` rounds, each round one step of every arm and
kind in turn (ended by `block_until_ready`) and one 2048^3 `jnp.dot` per compute dtype, so that every arm and
the dot see the same machine load; medians are reported. Batches are synthetic, of the config's padded shapes
(`data.*.max_tokens`, `max_masks`, `image_res`), with float32 images already normalised (uint8 images would be
normalised inside the step; that path imports TensorFlow, which accelerator images may lack).

Model FLOPs are `cclm_jax.flops.model_flops` (3 x forward, reference computation). MFU divides model FLOP/s by
the chip's dense bf16 peak (`cclm_jax.flops.peak_flops`, one entry per known accelerator); on a CPU, or any
unknown device, it divides by the median of the `jnp.dot` rounds in the step's compute dtype ("% of dot").
`--label` writes (or replaces) the subsection `### NAME` of the `## Train step` section of `--results`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cclm_jax import flops, parallel  # noqa: E402
from cclm_jax.aot import apply_overrides  # noqa: E402
from cclm_jax.models import build_model  # noqa: E402
from cclm_jax.optimizer import make_optimizer  # noqa: E402
from cclm_jax.run_config import load_config_file  # noqa: E402
from cclm_jax.train.steps import StepConfig, make_train_steps  # noqa: E402
from cclm_jax.train_state import create_train_state  # noqa: E402

SECTION = "## Train step"
GiB = 2 ** 30

# ---------------------------------------------------------------------------------------------------- config

def resolve_vocab_without_tokenizer(config: ml_collections.ConfigDict) -> None:
    """A vocabulary left to the tokenizer (-1) becomes the demo tokenizer's size (`data.demo.vocab_size`)."""
    text = config.model.text
    if text.vocab_size == -1:
        text.vocab_size = config.data.demo.vocab_size
        text.mask_token_id = text.vocab_size - 1


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """`NAME:key=value,key=value` -> (NAME, ['key=value', ...]); values must not contain commas."""
    name, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"--variant {spec!r} must look like NAME:key=value[,key=value]")
    return name, [kv for kv in rest.split(",") if kv]


# ----------------------------------------------------------------------------------------------------- batch

def batch_shapes(config: ml_collections.ConfigDict) -> dict[str, flops.TextShapes]:
    return flops.run_config_shapes(config)


def synthetic_batch(config: ml_collections.ConfigDict, kind: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch of `kind` with the config's padded shapes: random ids, tail padding, distinct masked positions."""
    rng = np.random.default_rng(seed)
    shapes = batch_shapes(config)[kind]
    t = config.model.text
    length, masks = shapes.tokens, shapes.masks

    def sentence():
        n = rng.integers(max(masks + 2, length // 2), length + 1, size=batch)
        atts = (np.arange(length)[None, :] < n[:, None]).astype(np.int32)
        ids = np.where(atts == 1, rng.integers(5, t.vocab_size - 1, size=(batch, length)), t.pad_token_id)
        return ids.astype(np.int32), atts, n

    ids, atts, n = sentence()
    pos = np.stack([np.sort(rng.choice(np.arange(1, k), size=masks, replace=False)) for k in n]).astype(np.int32)
    ids_masked = ids.copy()
    np.put_along_axis(ids_masked, pos, t.mask_token_id, axis=1)
    out = {"text_ids": ids, "text_atts": atts, "text_ids_masked": ids_masked, "masked_pos": pos,
           "masked_ids": np.take_along_axis(ids, pos, axis=1)}
    if kind == "image_caption":
        res = config.model.vision.image_res
        out["image"] = rng.standard_normal((batch, res, res, 3), dtype=np.float32)
    else:
        out["text_ids_2"], out["text_atts_2"], _ = sentence()
    return out


# ------------------------------------------------------------------------------------------------ measuring

def matmul_peak(dtype: str, n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of an n x n x n `jnp.dot` in `dtype` on the default device."""
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32).astype(dtype)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def memory_stats(compiled) -> dict[str, float]:
    """GiB from `compiled.memory_analysis()`: temp (XLA's packed scratch buffers), arguments, outputs, aliased
    (donated inputs reused as outputs), total = arguments + outputs - aliased + temp (what the step needs on the
    device), and XLA's own `peak_memory_in_bytes` where the backend reports one."""
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {"temp_gib": m.temp_size_in_bytes / GiB, "args_gib": m.argument_size_in_bytes / GiB,
            "out_gib": m.output_size_in_bytes / GiB, "alias_gib": m.alias_size_in_bytes / GiB,
            "total_gib": total / GiB, "xla_peak_gib": getattr(m, "peak_memory_in_bytes", 0) / GiB}


@dataclasses.dataclass
class Result:
    arm: str
    kind: str
    batch: int
    dtype: str
    lower_s: float
    compile_s: float
    compile_cpu_s: float
    step_ms: float
    step_ms_all: list[float]
    examples_per_s: float
    model_gflop_per_example: float
    model_tflops: float
    xla_gflop_per_step: float
    mfu: float | None
    dot_fraction: float
    memory: dict[str, float]
    loss: float


@dataclasses.dataclass
class Prepared:
    """One arm's compiled steps and their inputs, ready to be timed."""

    name: str
    config: ml_collections.ConfigDict
    state: Any
    compiled: dict[str, Any]
    batches: dict[str, Any]
    compile_info: dict[str, dict[str, Any]]
    times: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    loss: dict[str, float] = dataclasses.field(default_factory=dict)


def build_arm(config: ml_collections.ConfigDict):
    """(mesh, state, jitted steps by kind) built as the training loop builds them."""
    mesh = parallel.make_mesh(config.mesh)
    model = build_model(config.model)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.train.seed))
    params, params_shardings = parallel.init_sharded_params(model, config.model, mesh, init_rng)
    optimizer = make_optimizer(config.optimizer, config.schedule, params, updates_per_schedule_step=2)
    create = lambda p, r: create_train_state(p, optimizer, r)  # noqa: E731
    state_shardings = parallel.state_shardings(jax.eval_shape(create, params, state_rng), params_shardings, mesh)
    state = jax.jit(create, out_shardings=state_shardings)(params, state_rng)
    del params
    step_config = StepConfig(config.model, config.objectives, mesh, config.train.dropout)
    steps = make_train_steps(step_config, optimizer, "alternate", state_shardings, parallel.batch_sharding(mesh))
    return mesh, state, steps


def prepare_arm(name: str, config: ml_collections.ConfigDict, kinds: list[str], batch: dict[str, int],
                log=print) -> Prepared:
    """Build one configuration and compile each kind's step ahead of time (wall and CPU seconds, memory, cost)."""
    mesh, state, jitted = build_arm(config)
    compiled, batches, info = {}, {}, {}
    for kind in kinds:
        batches[kind] = {kind: parallel.host_batch_to_global(synthetic_batch(config, kind, batch[kind]), mesh)}
        t0, c0 = time.perf_counter(), time.process_time()
        lowered = jitted[kind].lower(state, batches[kind])
        t1 = time.perf_counter()
        compiled[kind] = lowered.compile()
        t2, c2 = time.perf_counter(), time.process_time()
        cost = compiled[kind].cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        info[kind] = {"lower_s": t1 - t0, "compile_s": t2 - t1, "compile_cpu_s": c2 - c0,
                      "memory": memory_stats(compiled[kind]), "xla_flops": float(cost.get("flops", 0.0)),
                      "devices": mesh.size}
        log(f"[{name}] {kind}: lower {t1 - t0:.1f}s compile {t2 - t1:.1f}s (lower + compile CPU {c2 - c0:.1f}s) "
            f"temp {info[kind]['memory']['temp_gib']:.3f} GiB", flush=True)
    return Prepared(name, config, state, compiled, batches, info)


def time_rounds(arms: list[Prepared], kinds: list[str], steps: int, dot_dtypes: list[str]) -> dict[str, list[float]]:
    """2 warm-up steps per arm and kind, then `steps` rounds; each round times one step of every arm and kind in
    turn (so that all of them see the same machine load) and one 2048^3 `jnp.dot` per dtype. Returns the dot
    FLOP/s of every round per dtype; step seconds go into each arm's `times`."""
    dots = {d: [] for d in dot_dtypes}
    for round_index in range(2 + steps):
        for arm in arms:
            for kind in kinds:
                s0 = time.perf_counter()
                arm.state, metrics = arm.compiled[kind](arm.state, arm.batches[kind])
                jax.block_until_ready((arm.state.step, metrics["loss"]))
                if round_index >= 2:
                    arm.times.setdefault(kind, []).append(time.perf_counter() - s0)
                arm.loss[kind] = float(metrics["loss"])
        if round_index >= 2:
            for d in dot_dtypes:
                dots[d].append(matmul_peak(d, reps=1))
    return dots


def summarise(arm: Prepared, kind: str, batch: int, dot_peak: dict[str, float]) -> Result:
    info, times = arm.compile_info[kind], arm.times[kind]
    step_s = statistics.median(times)
    config = arm.config
    per_example = flops.model_flops(config.model, kind, batch_shapes(config)[kind])
    model_flops_per_s = per_example * batch / step_s
    peak = flops.peak_flops(jax.devices()[0].device_kind)
    n = info["devices"]
    return Result(
        arm=arm.name, kind=kind, batch=batch, dtype=config.model.dtype, lower_s=info["lower_s"],
        compile_s=info["compile_s"], compile_cpu_s=info["compile_cpu_s"], step_ms=1e3 * step_s,
        step_ms_all=[round(1e3 * t, 2) for t in times], examples_per_s=batch / step_s,
        model_gflop_per_example=per_example / 1e9, model_tflops=model_flops_per_s / 1e12,
        xla_gflop_per_step=info["xla_flops"] / 1e9, mfu=None if peak is None else model_flops_per_s / (peak * n),
        dot_fraction=model_flops_per_s / (dot_peak[config.model.dtype] * n), memory=info["memory"],
        loss=arm.loss[kind])


# --------------------------------------------------------------------------------------------------- report

def machine_description(dot_peak: dict[str, float]) -> str:
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"model name\s*:\s*(.*)", f.read())
        cpu = names[0].strip() if names else cpu
    text = f"{jax.device_count()} x {device.device_kind} ({device.platform}); host {cpu}, {os.cpu_count()} cores"
    if os.path.exists("/proc/loadavg"):
        with open("/proc/loadavg") as f:
            text += f" (load average {f.read().split()[0]} at start)"
    if dot_peak:
        text += "; measured 2048^3 jnp.dot: " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in dot_peak.items())
    return text


def git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown_table(results: list[Result]) -> str:
    base = {r.kind: r for r in results if r.arm == results[0].arm}
    header = ("| arm | kind | batch | dtype | lower + compile s (CPU s) | step ms | examples/s | model GFLOP/ex | "
              "model TFLOP/s | MFU | % of dot | temp GiB | total GiB | speed-up | temp ratio |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        b = base[r.kind]
        mfu = "n/a" if r.mfu is None else f"{r.mfu:.1%}"
        ratio_mem = r.memory["temp_gib"] / b.memory["temp_gib"] if b.memory["temp_gib"] else float("nan")
        lines.append(
            f"| {r.arm} | {r.kind} | {r.batch} | {r.dtype} | {r.lower_s:.0f} + {r.compile_s:.0f} ({r.compile_cpu_s:.0f}) | "
            f"{r.step_ms:.1f} | "
            f"{r.examples_per_s:.2f} | {r.model_gflop_per_example:.2f} | {r.model_tflops:.3f} | {mfu} | "
            f"{r.dot_fraction:.1%} | {r.memory['temp_gib']:.3f} | {r.memory['total_gib']:.3f} | "
            f"{b.step_ms / r.step_ms:.2f}x | {ratio_mem:.2f}x |")
    return "\n".join(lines)


def write_subsection(path: str, section: str, label: str, body: str) -> None:
    """Create or replace `### label` inside `section` (a `## ` heading) of a markdown file; other text stays."""
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    parts = re.split(r"(?m)^(?=## )", text)
    index = next((i for i, p in enumerate(parts) if p.splitlines()[0].strip() == section), None)
    if index is None:
        parts.append(f"{section}\n\n")
        index = len(parts) - 1
    subs = re.split(r"(?m)^(?=### )", parts[index])
    new = f"### {label}\n\n{body.strip()}\n\n"
    for i, sub in enumerate(subs):
        if sub.splitlines()[0].strip() == f"### {label}":
            subs[i] = new
            break
    else:
        if not subs[-1].endswith("\n\n"):
            subs[-1] = subs[-1].rstrip("\n") + "\n\n"
        subs.append(new)
    parts[index] = "".join(subs)
    if index < len(parts) - 1 and not parts[index].endswith("\n\n"):
        parts[index] = parts[index].rstrip("\n") + "\n\n"
    with open(path, "w") as f:
        f.write("".join(parts).rstrip("\n") + "\n")


# ----------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="path/to/config.py[:arg]")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every arm")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]")
    parser.add_argument("--batch", type=int, default=0, help="global batch per kind (default: the config's)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per kind (after 2 warm-up steps)")
    parser.add_argument("--kinds", default=",".join(flops.KINDS))
    parser.add_argument("--label", default="", help="write `### LABEL` under `## Train step` in --results")
    parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "RESULTS.md"))
    parser.add_argument("--note", default="", help="a sentence written under the table")
    parser.add_argument("--json", default="", help="also write the raw results here")
    args = parser.parse_args(argv)

    path, _, arg = args.config.partition(":")
    base = load_config_file(path, arg)
    resolve_vocab_without_tokenizer(base)
    base = apply_overrides(base, args.set)
    arms = [("baseline", base)] + [(name, apply_overrides(base, kv)) for name, kv in map(parse_variant, args.variant)]
    kinds = [k for k in args.kinds.split(",") if k]
    for kind in kinds:
        if kind not in flops.KINDS:
            raise ValueError(f"--kinds: {kind!r} is not one of {flops.KINDS}")
    batch = {k: args.batch or base.data[k].batch_size * jax.process_count() for k in kinds}
    dtypes = sorted({cfg.model.dtype for _, cfg in arms})
    machine = machine_description({})
    print(machine, flush=True)
    prepared = [prepare_arm(name, cfg, kinds, batch) for name, cfg in arms]
    dots = time_rounds(prepared, kinds, args.steps, dtypes)
    dot_peak = {d: statistics.median(v) for d, v in dots.items()}
    machine = machine_description(dot_peak)
    results = [summarise(arm, kind, batch[kind], dot_peak) for arm in prepared for kind in kinds]
    table = markdown_table(results)
    print(table)
    command = "python benchmarks/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = (f"{datetime.date.today().isoformat()}, commit `{git_head()}`, jax {jax.__version__}; {machine}.\n"
            f"`{command}`\n\n{table}\n")
    if args.note:
        body += f"\n{args.note}\n"
    if args.label:
        write_subsection(args.results, SECTION, args.label, body)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "commit": git_head(), "jax": jax.__version__,
                       "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
