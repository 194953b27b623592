"""The `cclm-jax` command line (also `python -m cclm_jax`).

  cclm-jax train    --config configs/demo.py --workdir DIR [--config.train.num_steps=100 ...]
  cclm-jax finetune --config configs/finetune/T.py[:protocol] --workdir DIR   fine-tune, test, report
  cclm-jax evaluate --config C --workdir DIR          a fine-tuning config: test sets of a fine-tuned run;
                                                      a pre-training config: dev retrieval
  cclm-jax info     --config C                        parameter counts (tied weights once), per module
  cclm-jax export   --workdir DIR --out F.th [--step N] [--format th|safetensors]
  cclm-jax import   --checkpoint F.th --workdir DIR [--text_num_heads N]   (N only for files recording none)

`--config` takes a config file with `get_config(arg)`; `configs/X.py:arg` passes `arg`, and
`--config.a.b=value` overrides any field (the config is locked: unknown fields are an error).
"""
from __future__ import annotations

import json
import logging
import os
import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

COMMANDS = ("train", "finetune", "evaluate", "info", "export", "import")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config(arg)); path[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config).")
_OUT = flags.DEFINE_string("out", None, "export: output file (.th) or directory (safetensors).")
_FORMAT = flags.DEFINE_enum("format", "th", ["th", "safetensors"], "export: checkpoint format.")
_STEP = flags.DEFINE_integer("step", None, "export/evaluate: checkpoint step (default: latest).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "import: official CCLM .th/.pth file.")
_TEXT_HEADS = flags.DEFINE_integer("text_num_heads", None, "import: text attention heads of a file that records "
                                   "none (default: 16 for width 1024, 12 for 768; a recorded count wins).")


def _require(flag, command: str):
    if flag.value is None:
        raise app.UsageError(f"cclm-jax {command}: --{flag.name} is required")
    return flag.value


def count_parameters(model_config) -> dict[str, int]:
    """Unique parameters per top-level module (the tied MLM decoder counted once, as the reference)."""
    from cclm_jax.interop.shapes import param_shapes

    shapes = param_shapes(model_config)
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)  # noqa: E731
    return {name: int(sum(np.prod(s) for s in jax.tree.leaves(sub, is_leaf=is_shape)))
            for name, sub in shapes.items()}


def cmd_info() -> None:
    config = _require(_CONFIG, "info")
    counts = count_parameters(config.model)
    total = sum(counts.values())
    width = max(len(k) for k in counts)
    print(f"{'module':<{width}}  {'parameters':>13}")
    for name, n in counts.items():
        print(f"{name:<{width}}  {n:>13,}")
    print(f"{'total':<{width}}  {total:>13,}")
    print(f"total parameters: {total}")
    try:
        from cclm_jax import flops

        print(flops.describe(config))
    except ImportError:
        pass


def cmd_train() -> None:
    from cclm_jax.train.loop import train

    results = train(_require(_CONFIG, "train"), _require(_WORKDIR, "train"))
    print(json.dumps({k: v for k, v in results.items() if np.isscalar(v)}, indent=1, sort_keys=True))


def cmd_finetune() -> None:
    from cclm_jax.train.finetune_loop import finetune

    out = finetune(_require(_CONFIG, "finetune"), _require(_WORKDIR, "finetune"))
    print(json.dumps(out.get("results", out), indent=1, sort_keys=True, default=float))


def cmd_evaluate() -> None:
    config, workdir = _require(_CONFIG, "evaluate"), _require(_WORKDIR, "evaluate")
    if "task" in config:  # a fine-tuning config (configs/finetune/*.py)
        from cclm_jax.train.finetune_loop import evaluate

        results = evaluate(config, workdir, _STEP.value)
    else:
        from cclm_jax.evaluation.dev import evaluate_workdir

        results = evaluate_workdir(config, workdir, _STEP.value)
    print(json.dumps(results, indent=1, sort_keys=True, default=float))


def cmd_export() -> None:
    from cclm_jax.interop.workdir import export_workdir

    path = export_workdir(_require(_WORKDIR, "export"), _require(_OUT, "export"), step=_STEP.value,
                          fmt=_FORMAT.value)
    print(f"exported to {path}")


def cmd_import() -> None:
    from cclm_jax.interop.workdir import import_to_workdir

    step = import_to_workdir(_require(_CHECKPOINT, "import"), _require(_WORKDIR, "import"),
                             text_num_heads=_TEXT_HEADS.value)
    print(f"imported {_CHECKPOINT.value} into {_WORKDIR.value} as step {step}")


def main(argv) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: cclm-jax {{{','.join(COMMANDS)}}} [flags]; got {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    {"train": cmd_train, "finetune": cmd_finetune, "evaluate": cmd_evaluate, "info": cmd_info, "export": cmd_export,
     "import": cmd_import}[argv[1]]()


def run() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main, argv=sys.argv)
