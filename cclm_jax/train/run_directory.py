"""A run directory belongs to one run: its `config.json` is compared with the config of every restart before
anything is written, and only changes that cannot break exact resume are accepted.

`check_same_run(config, workdir)`: when `workdir/config.json` exists, every key whose value differs is listed;
keys under `RESUMABLE_CHANGES` (run length, logging, checkpointing, evaluation, mesh and placement, runtime
switches that change no parameter or batch) are accepted with a warning; any other difference (model, data,
objectives, optimizer, schedule, seeds, batch sizes, task) is refused with one line naming the keys, and the old
run's files stay as they were.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections

from cclm_jax.optimizer import upgrade_legacy_section

log = logging.getLogger(__name__)

# Dotted key prefixes a restart may change: they decide when to stop, what to log, save and evaluate, and how the
# same computation is placed, never which batches are drawn or what an update computes.
RESUMABLE_CHANGES = (
    "train.num_steps", "train.epochs", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.keep_every", "train.eval_every", "train.eval_k_test",  # (removed keys, still in older runs)
    "train.profile_start", "train.profile_steps",
    "train.nonfinite", "train.max_consecutive_skips", "eval.", "evals.", "data.eval.", "mesh.", "distributed",
    "init.", "model.remat", "model.scan_layers", "model.cache_cross_kv", "model.attention_impl",
    "data.data_dir", "data.threads", "data.prefetch", "data.cache_dir",
)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def config_differences(saved: dict, config: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts (present in one only counts)."""
    a, b = _flat(saved), _flat(config)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


def _resumable(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESUMABLE_CHANGES)


def _as_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def added_since(saved: dict, config: dict) -> set[str]:
    """Dotted keys of `config` that `saved` lacks and whose value is today's default (`default_run_config`, or a
    fine-tuning task's `default_finetune_config`): keys added to the package after the run was written, at the
    value the run used without knowing them (a new batch kind's ratio only at 0)."""
    from cclm_jax.run_config import default_run_config
    from cclm_jax.tasks import default_finetune_config

    default = default_finetune_config(config["task"]) if config.get("task") else default_run_config()
    old, new, defaults = _flat(saved), _flat(config), _flat(_as_json(default))
    return {k for k, v in new.items() if k not in old and k in defaults and defaults[k] == v
            and (not k.startswith("data.mix.") or v == 0)}


def check_same_run(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuse (ValueError, one line) a config that differs from `workdir/config.json` in a key that would break
    exact resume; warn about the accepted changes. Nothing to check in a new directory."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        saved = json.load(f)
    if saved.get("data", {}).get("host_shards") == 0 and "host_shards" in config.get("data", {}):
        saved["data"]["host_shards"] = config.data.host_shards  # written before it was resolved (one per process)
    if "optimizer" in saved:  # the substring lists of earlier versions, in today's regex tables
        saved["optimizer"] = upgrade_legacy_section(saved["optimizer"])
    differing = sorted(set(config_differences(saved, _as_json(config))) - added_since(saved, _as_json(config)))
    refused = [k for k in differing if not _resumable(k)]
    if refused:
        shown = ", ".join(f"{k} ({_flat(saved).get(k, '<absent>')!r} -> {_flat(_as_json(config)).get(k, '<absent>')!r})"
                          for k in refused[:8])
        more = f" and {len(refused) - 8} more" if len(refused) > 8 else ""
        raise ValueError(f"{workdir} holds another run: its config.json differs in {shown}{more}; use a new "
                         "--workdir (or the run's own config) -- nothing was written")
    if differing:
        log.warning("resuming %s with changed %s (these do not change the batches or the updates)", workdir,
                    ", ".join(differing))


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Write the resolved config to `workdir/config.json` (process 0; atomically)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    with open(f"{path}.tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(f"{path}.tmp", path)
