"""Moving checkpoints between PyTorch files and run directories (`cclm-jax import` / `cclm-jax export`).

- `import_to_workdir(checkpoint, workdir)`: an official CCLM `.th` (or an exported safetensors file) of any
  layout (`layout.LAYOUTS`) becomes step 0 of a run directory: `workdir/config.json` and an Orbax checkpoint
  holding the parameters only (a run resuming from it starts a fresh optimizer state). A pre-training checkpoint gets the default run config
  with the imported architecture (`cclm-jax train` continues from it); a fine-tuning checkpoint (retrieval,
  XVNLI, NLVR/MaRVL, VQA/xGQA) gets `finetune.default_finetune_config(task)` with the imported architecture, its
  `task` naming the model the parameters belong to (`layout.LAYOUT_TASKS`), so evaluation and fine-tuning
  build the right model. `evaluate` and `export` read either kind.
- `export_workdir(workdir, out, step=None, fmt='th')`: the parameters of a run's checkpoint (latest by
  default) in the official layout of the run's task, as the official `{'model': state_dict, 'config': ...}`
  `.th`, or `model.safetensors` + `config.json`.

Only parameters are read (`restore_params`): the optimizer state of a run is never loaded here.
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
from cclm_jax.interop.files import open_checkpoint
from cclm_jax.interop.layout import LAYOUT_TASKS, layout_of_task
from cclm_jax.interop.shapes import abstract_params
from cclm_jax.run_config import default_run_config


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


def import_run_config(layout: str, model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run config of an imported checkpoint: pre-training defaults, or the fine-tuning defaults of the
    layout's task; `model` is the imported architecture either way."""
    task = LAYOUT_TASKS[layout]
    if task is None:
        config = default_run_config()
    else:
        from cclm_jax.train.finetune import default_finetune_config  # the fine-tuning stack, only when needed

        config = default_finetune_config(task)
        config.init.text_num_heads = int(model_config.text.num_heads)
    config.model = model_config
    return config


def import_to_workdir(checkpoint: str, workdir: str, *, text_num_heads: int | None = None) -> int:
    """Import an official checkpoint as step 0 of `workdir`; returns the step written."""
    model_config, params = official.load(checkpoint, text_num_heads=text_num_heads)
    layout = official.detect_layout(open_checkpoint(checkpoint))
    config = import_run_config(layout, model_config)
    config.init.checkpoint = os.path.abspath(checkpoint)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    checkpointer = Checkpointer(workdir, every=1, keep=1_000_000)
    if checkpointer.latest_step() is not None:
        checkpointer.close()
        raise FileExistsError(f"{workdir} already holds checkpoints; import into an empty run directory")
    checkpointer.save_params(0, params, jax.random.PRNGKey(config.train.seed))
    checkpointer.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    return 0
