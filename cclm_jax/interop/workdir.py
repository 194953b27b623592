"""Moving checkpoints between PyTorch files and run directories (`cclm-jax import` / `cclm-jax export`).

- `import_to_workdir(checkpoint, workdir)`: an official CCLM `.th` (or an exported safetensors file) becomes
  step 0 of a run directory: `workdir/config.json` (the default run config with the imported architecture)
  and an Orbax checkpoint holding the parameters with a fresh optimizer state. `cclm-jax train` on that
  workdir continues from it, `evaluate` and `export` read it.
- `export_workdir(workdir, out, step=None, fmt='th')`: the parameters of a run's checkpoint (latest by
  default) as the official `{'model': state_dict, 'config': ...}` `.th`, or `model.safetensors` + `config.json`.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections

from cclm_jax.checkpoint import Checkpointer, abstract_like
from cclm_jax.interop import export, official
from cclm_jax.run_config import default_run_config
from cclm_jax.train.optimizer import make_optimizer
from cclm_jax.train.state import create_train_state


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to `workdir/config.json`."""
    path = os.path.join(os.path.expanduser(workdir), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not a run directory (no config.json; was it trained or imported?)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _abstract_state(config: ml_collections.ConfigDict):
    from cclm_jax.interop.shapes import abstract_params
    from flax import linen as nn

    params = nn.meta.unbox(abstract_params(config.model))
    optimizer = make_optimizer(config.optimizer, config.schedule, params, config.model)
    return jax.eval_shape(lambda p: create_train_state(p, optimizer, jax.random.PRNGKey(0)), params), optimizer


def restore_params(workdir: str, step: int | None = None):
    """(run config, parameters of `step` or the latest checkpoint) on the default device."""
    config = read_run_config(workdir)
    abstract, _ = _abstract_state(config)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = abstract_like(abstract, jax.tree.map(lambda _: device, abstract))
    checkpointer = Checkpointer(workdir, every=1, keep=1_000_000)
    try:
        state, _ = checkpointer.restore(target, step)
    finally:
        checkpointer.close()
    return config, state.params


def export_workdir(workdir: str, out: str, *, step: int | None = None, fmt: str = "th") -> str:
    """Write a run's parameters as an official `.th` file or a safetensors directory; returns the path."""
    config, params = restore_params(workdir, step)
    if fmt == "th":
        official.save(out, config.model, params)
        return out
    if fmt == "safetensors":
        return str(export.export_safetensors(out, config.model, params))
    raise ValueError(f"unknown export format {fmt!r}; expected 'th' or 'safetensors'")


def import_to_workdir(checkpoint: str, workdir: str, *, text_num_heads: int | None = None) -> int:
    """Import an official checkpoint as step 0 of `workdir`; returns the step written."""
    model_config, params = official.load(checkpoint, text_num_heads=text_num_heads)
    config = default_run_config()
    config.model = model_config
    config.init.checkpoint = os.path.abspath(checkpoint)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    checkpointer = Checkpointer(workdir, every=1, keep=1_000_000)
    if checkpointer.latest_step() is not None:
        checkpointer.close()
        raise FileExistsError(f"{workdir} already holds checkpoints; import into an empty run directory")
    _, optimizer = _abstract_state(config)
    state = jax.jit(lambda p: create_train_state(p, optimizer, jax.random.PRNGKey(config.train.seed)))(params)
    checkpointer.save(0, state, {}, force=True)
    checkpointer.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    return 0
