"""Training metrics: TensorBoard + a JSON-lines file + a compact console line (process 0 writes).

Step measurements stay on the device until a log step; then they are fetched together, averaged per batch
kind and written as `train/<kind>/<name>`, with throughput (`examples_per_sec`), step time, the fraction of
time spent waiting for input, model FLOPs and MFU, non-finite update and skipped-example counts, and an ETA.

Timing: JAX dispatches steps asynchronously, so `record` waits for the *previous* step to finish (one step
stays in flight, so the device is kept busy) and a step's time is the wall time between the completions of
the step before it and itself. Model FLOPs are analytic (`cclm_jax.flops.run_model_flops`, 3 x forward of the
reference computation per example, the numbers `cclm-jax info` prints) times the global batch; MFU divides
model FLOP/s by the dense bf16 peak of all chips (`flops.peak_flops` of the device kind x `jax.device_count()`)
and is left out where the peak is unknown (CPUs).
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from clu import metric_writers

from cclm_jax import flops
from cclm_jax.train import console

log = logging.getLogger(__name__)

CONSOLE_NAMES = tuple(f"/{name}" for name in ("loss", "itc", "ttc", "itm", "ttm", "mlm", "ce", "accuracy", "answer"))


def flop_rates(prefix: str, model_flop: float, seconds: float, peak: float | None,
               num_devices: int) -> dict[str, float]:
    """`{prefix}model_tflop_per_sec` (TFLOP/s of `model_flop` FLOPs in `seconds`) and, when the chip's peak
    FLOP/s is known, `{prefix}mfu` = model FLOP/s / (peak x `num_devices`) as a fraction."""
    per_sec = model_flop / max(seconds, 1e-9)
    out = {f"{prefix}model_tflop_per_sec": per_sec / 1e12}
    if peak is not None:
        out[f"{prefix}mfu"] = per_sec / (peak * num_devices)
    return out


def format_duration(seconds: float) -> str:
    """'H:MM:SS' (hours unbounded) of a non-negative duration."""
    whole = int(max(seconds, 0.0) + 0.5)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def console_line(step: int, num_steps: int, scalars: Mapping[str, float]) -> str:
    """The one console line of a log step: `step S/T  <losses>  X.XXs/step  N ex/s  [F TFLOP/s  MFU M%]  ETA H:MM:SS`
    (losses: the `CONSOLE_NAMES` of every update kind; FLOP rates and MFU only where known)."""
    per_step = scalars["train/seconds_per_step"]
    losses = " ".join(f"{k.removeprefix('train/')}={v:.4f}" for k, v in scalars.items() if k.endswith(CONSOLE_NAMES))
    parts = [f"step {step}/{num_steps}", losses, f"{per_step:.2f}s/step",
             f"{scalars['train/examples_per_sec']:.1f} ex/s"]
    if "train/model_tflop_per_sec" in scalars:
        parts.append(f"{scalars['train/model_tflop_per_sec']:.3g} TFLOP/s")
    if "train/mfu" in scalars:
        parts.append(f"MFU {scalars['train/mfu']:.1%}")
    parts.append(f"ETA {format_duration(per_step * (num_steps - step))}")
    return "  ".join(p for p in parts if p)


class ScalarSink:
    """Where a run's scalars go: TensorBoard events (clu) and `workdir/metrics.jsonl` (one JSON object per write,
    `{"step": N, name: value, ...}`, appended so a resumed run continues the file). A run resumed from
    `resume_step` first drops the rows written after that step (they belong to the lost steps and will be written
    again), so every step has one row. Only process 0 writes; the others only log."""

    def __init__(self, workdir: str, resume_step: int | None = None):
        self.is_writer = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(workdir, just_logging=not self.is_writer)
        path = os.path.join(workdir, "metrics.jsonl")
        if self.is_writer and resume_step is not None and os.path.isfile(path):
            truncate_rows_after(path, resume_step)
        self.jsonl = open(path, "a") if self.is_writer else None

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        self.writer.write_scalars(step, dict(scalars))
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        self.writer.flush()
        if self.jsonl is not None:
            self.jsonl.close()


def truncate_rows_after(path: str, step: int) -> int:
    """Drop the rows of a metrics.jsonl whose `step` is greater than `step` (atomically); returns how many."""
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if not line.strip() or json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return len(lines) - len(kept)


class MetricsWriter:
    """Collects step measurements (`record`) and writes them every log step (`flush`), for every run.

    `flop_per_example`: model FLOPs per example of each batch kind (`flops.run_model_flops`; empty where unknown:
    no FLOP rates then). `kind_prefix`: names are `train/<kind>/<name>` (pre-training's batch kinds) or
    `train/<name>` (one kind). `resume_step`: see `ScalarSink`. `device_kind` (default: the first device's) picks
    the peak for MFU; `clock` (seconds) is for tests.
    """

    def __init__(self, workdir: str, num_steps: int, flop_per_example: Mapping[str, float], *,
                 kind_prefix: bool = True, resume_step: int | None = None, device_kind: str | None = None,
                 clock: Callable[[], float] = time.time):
        self.sink = ScalarSink(workdir, resume_step)
        self.is_writer = self.sink.is_writer
        self.num_steps = num_steps
        self.flop_per_example = dict(flop_per_example)
        self.kind_prefix = kind_prefix
        self.peak = flops.peak_flops(jax.devices()[0].device_kind if device_kind is None else device_kind)
        self.num_devices = jax.device_count()
        self.num_processes = jax.process_count()
        self.clock = clock
        # [kind, device metrics, host rows per batch kind, input seconds, step seconds (None while in flight)]
        self.pending: list[list] = []
        self.t_last = self.t_done = clock()

    def record(self, kind: str, step_metrics: dict, sizes: Mapping[str, int], *, input_seconds: float):
        """Keep one step's (device) measurements; waits for the previous step to finish (which times it)."""
        self._finish_previous()
        self.pending.append([kind, step_metrics, dict(sizes), input_seconds, None])

    def _finish_previous(self) -> None:
        if self.pending and self.pending[-1][4] is None:
            jax.block_until_ready(self.pending[-1][1])
            now = self.clock()
            self.pending[-1][4] = now - self.t_done
            self.t_done = now

    def exclude(self, work: Callable[[], Any]) -> Any:
        """Run `work` (an evaluation, a checkpoint wait) outside the step timing: the step in flight is timed
        first, and the wall time of `work` is left out of the next step's time and of the interval rates."""
        self._finish_previous()
        start = self.clock()
        try:
            return work()
        finally:
            spent = self.clock() - start
            self.t_done += spent
            self.t_last += spent

    def step_model_flop(self, sizes: Mapping[str, int]) -> float:
        """Model FLOPs of one step: per-example FLOPs x global rows of each batch kind it trained on."""
        return float(sum(self.flop_per_example[k] * n * self.num_processes for k, n in sizes.items()))

    def _has_flops(self, sizes: Mapping[str, int]) -> bool:
        return all(k in self.flop_per_example for k in sizes)

    def flush(self, step: int, state, extra: Mapping[str, float]) -> dict:
        """Fetch, average and write everything recorded since the last flush, with the `extra` scalars (the input
        pipelines' counters); returns the scalars."""
        fetched = jax.device_get([m for _, m, _, _, _ in self.pending])
        self._finish_previous()
        scalars: dict[str, float] = {}
        groups: dict[str, list] = defaultdict(list)
        for (kind, _, sizes, t_in, t_step), values in zip(self.pending, fetched):
            groups[kind].append((values, sizes, t_in, t_step))
        for kind, items in groups.items():
            prefix = f"train/{kind}/" if self.kind_prefix else "train/"
            names = items[0][0].keys()
            for name in names:
                scalars[f"{prefix}{name}"] = float(np.mean([v[name] for v, _, _, _ in items]))
            examples = sum(sum(s.values()) for _, s, _, _ in items) * self.num_processes
            seconds = sum(t for _, _, _, t in items)
            scalars[f"{prefix}examples_per_sec"] = examples / max(seconds, 1e-9)
            scalars[f"{prefix}step_seconds"] = seconds / len(items)
            scalars[f"{prefix}input_wait_fraction"] = sum(t for _, _, t, _ in items) / max(seconds, 1e-9)
            if all(self._has_flops(s) for _, s, _, _ in items):
                model_flop = sum(self.step_model_flop(s) for _, s, _, _ in items)
                scalars[f"{prefix}model_tflop_per_step"] = model_flop / len(items) / 1e12
                scalars.update(flop_rates(prefix, model_flop, seconds, self.peak, self.num_devices))
        scalars["train/nonfinite_updates"] = float(jax.device_get(state.nonfinite))
        scalars.update({k: float(v) for k, v in extra.items()})
        now = self.clock()
        steps = max(len(self.pending), 1)
        per_step = (now - self.t_last) / steps
        scalars["train/seconds_per_step"] = per_step
        if all(self._has_flops(sizes) for _, _, sizes, _, _ in self.pending):
            interval_flop = sum(self.step_model_flop(sizes) for _, _, sizes, _, _ in self.pending)
            scalars.update(flop_rates("train/", interval_flop, now - self.t_last, self.peak, self.num_devices))
        examples = sum(sum(sizes.values()) for _, _, sizes, _, _ in self.pending) * self.num_processes
        scalars["train/examples_per_sec"] = examples / max(now - self.t_last, 1e-9)
        self.sink.write(step, scalars)
        if self.is_writer:
            console.progress.info(console_line(step, self.num_steps, scalars))
        self.pending.clear()
        self.t_last = self.t_done = now
        return scalars

    def close(self) -> None:
        self.sink.close()
