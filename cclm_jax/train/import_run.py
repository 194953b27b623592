"""`cclm-jax import`: an official checkpoint becomes step 0 of a run directory.

`import_to_workdir(checkpoint, workdir)`: an official CCLM `.th` (or an exported safetensors file) of any layout
(`interop.layout.LAYOUTS`) becomes `workdir/config.json` and an Orbax checkpoint holding the parameters only (a
run resuming from it starts a fresh optimizer state). A pre-training checkpoint gets the default run config with
the imported architecture (`cclm-jax train` continues from it); a fine-tuning checkpoint (retrieval, XVNLI,
NLVR/MaRVL, VQA/xGQA) gets `tasks.default_finetune_config(task)` with the imported architecture, its `task`
naming the model the parameters belong to (`interop.layout.LAYOUT_TASKS`), so evaluation and fine-tuning build
the right model. `cclm-jax evaluate` and `cclm-jax export` (`interop.workdir`) read either kind.

It lives in the training layer because it writes run configs (`run_config`, `tasks`), which `interop` does not
import.
"""
from __future__ import annotations

import os

import jax
import ml_collections

from cclm_jax.checkpoint import Checkpointer
from cclm_jax.interop import official
from cclm_jax.interop.files import open_checkpoint
from cclm_jax.interop.layout import LAYOUT_TASKS
from cclm_jax.run_config import default_run_config
from cclm_jax.tasks import default_finetune_config


def import_run_config(layout: str, model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run config of an imported checkpoint: pre-training defaults, or the fine-tuning defaults of the
    layout's task; `model` is the imported architecture either way."""
    task = LAYOUT_TASKS[layout]
    if task is None:
        config = default_run_config()
    else:
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
