"""Reading run directories, and writing their parameters as PyTorch files (`cclm-jax export`).

- `read_run_config(workdir)`: the resolved config a run wrote; `restore_params(workdir, step)`: its parameters.
- `export_workdir(workdir, out, step=None, fmt='th')`: the parameters of a run's checkpoint (latest by
  default) in the official layout of the run's task, as the official `{'model': state_dict, 'config': ...}`
  `.th`, or `model.safetensors` + `config.json`.

Only parameters are read (`restore_params`): the optimizer state of a run is never loaded here. The other way,
`cclm-jax import` (a PyTorch file -> a run directory with a run config), is `cclm_jax.train.import_run`: the
run configs it writes are the training layer's (`run_config`, `tasks`), which interop does not import.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
from flax import linen as nn

from cclm_jax.checkpoint import Checkpointer, abstract_like
from cclm_jax.interop import export, official
from cclm_jax.interop.layout import layout_of_task
from cclm_jax.interop.shapes import abstract_params


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to `workdir/config.json`."""
    path = os.path.join(os.path.expanduser(workdir), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not a run directory (no config.json; was it trained or imported?)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def run_layout(config: ml_collections.ConfigDict) -> str:
    """The official layout of a run's parameters: its `task`'s (fine-tuning), else 'pretrain'."""
    return layout_of_task(config.get("task"))


def restore_params(workdir: str, step: int | None = None, shardings: Any | None = None):
    """(run config, parameters of `step` or the latest checkpoint), placed in `shardings` (default: all on the
    first device). Only the parameters item is read, never the optimizer state."""
    config = read_run_config(workdir)
    abstract = nn.meta.unbox(abstract_params(config.model, run_layout(config)))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    checkpointer = Checkpointer(workdir, every=1, keep=1_000_000)
    try:
        params = checkpointer.restore_params(abstract_like(abstract, shardings), step)
    finally:
        checkpointer.close()
    return config, params


def export_workdir(workdir: str, out: str, *, step: int | None = None, fmt: str = "th") -> str:
    """Write a run's parameters as an official `.th` file or a safetensors directory; returns the path."""
    if fmt not in ("th", "safetensors"):
        raise ValueError(f"unknown export format {fmt!r}; expected 'th' or 'safetensors'")
    config, params = restore_params(workdir, step)
    layout = run_layout(config)
    if fmt == "th":
        official.save(out, config.model, params, layout=layout)
        return out
    return str(export.export_safetensors(out, config.model, params, layout=layout))
