"""Training metrics: TensorBoard + a JSON-lines file + a compact console line (process 0 writes).

Step measurements stay on the device until a log step; then they are fetched together, averaged per batch
kind and written as `train/<kind>/<name>`, with throughput (`examples_per_sec`), step time, the fraction of
time spent waiting for input, non-finite update and skipped-example counts, and an ETA.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict

import jax
import ml_collections
import numpy as np
from clu import metric_writers

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, workdir: str, config: ml_collections.ConfigDict):
        self.is_writer = jax.process_index() == 0
        self.num_steps = config.train.num_steps
        self.writer = metric_writers.create_default_writer(workdir, just_logging=not self.is_writer)
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if self.is_writer else None
        self.pending: list[tuple[str, dict, dict, float, float]] = []
        self.t_last = time.time()
        self.steps_since = 0

    def record(self, kind: str, step_metrics: dict, sizes: dict, *, input_seconds: float, step_seconds: float):
        """Keep one step's (device) measurements; nothing is fetched here."""
        self.pending.append((kind, step_metrics, sizes, input_seconds, step_seconds))
        self.steps_since += 1

    def flush(self, step: int, state, iterators: dict) -> dict:
        """Fetch, average and write everything recorded since the last flush; returns the scalars."""
        fetched = jax.device_get([m for _, m, _, _, _ in self.pending])
        scalars: dict[str, float] = {}
        groups: dict[str, list] = defaultdict(list)
        for (kind, _, sizes, t_in, t_step), values in zip(self.pending, fetched):
            groups[kind].append((values, sizes, t_in, t_step))
        for kind, items in groups.items():
            names = items[0][0].keys()
            for name in names:
                scalars[f"train/{kind}/{name}"] = float(np.mean([v[name] for v, _, _, _ in items]))
            examples = sum(sum(s.values()) for _, s, _, _ in items) * jax.process_count()
            seconds = sum(t for _, _, _, t in items)
            scalars[f"train/{kind}/examples_per_sec"] = examples / max(seconds, 1e-9)
            scalars[f"train/{kind}/step_seconds"] = seconds / len(items)
            scalars[f"train/{kind}/input_wait_fraction"] = sum(t for _, _, t, _ in items) / max(seconds, 1e-9)
        scalars["train/nonfinite_updates"] = float(jax.device_get(state.nonfinite))
        for it in iterators.values():
            scalars.update({k: float(v) for k, v in it.metrics().items()})
        now = time.time()
        per_step = (now - self.t_last) / max(self.steps_since, 1)
        scalars["train/seconds_per_step"] = per_step
        self.writer.write_scalars(step, scalars)
        self._write_jsonl(step, scalars)
        if self.is_writer:
            eta = per_step * (self.num_steps - step)
            losses = " ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in scalars.items()
                              if k.endswith(("/loss", "/itc", "/ttc", "/itm", "/ttm", "/mlm")))
            log.info("step %d/%d  %s  %.2fs/step  ETA %s", step, self.num_steps, losses, per_step,
                     time.strftime("%H:%M:%S", time.gmtime(max(eta, 0))))
        self.pending.clear()
        self.t_last, self.steps_since = now, 0
        return scalars

    def write_eval(self, step: int, results: dict) -> None:
        scalars = {f"eval/{k}": float(v) for k, v in results.items() if np.isscalar(v)}
        self.writer.write_scalars(step, scalars)
        self._write_jsonl(step, scalars)
        if self.is_writer:
            log.info("eval at step %d: %s", step, "  ".join(f"{k}={v:.2f}" for k, v in scalars.items()))

    def _write_jsonl(self, step: int, scalars: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        self.writer.flush()
        if self.jsonl is not None:
            self.jsonl.close()
