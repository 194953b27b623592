"""Pre-training as a trainer `Task` (`cclm-jax train`): the fixed-ratio mixture of image–caption and parallel-text
batches (and region batches in the 4M setting), one optimizer update per batch kind ('alternate', the reference) or
one on all of them ('joint').

`build_task(config, workdir, resuming)`:
- validates the config and loads the tokenizer (model vocab -1 is taken from it) before anything compiles;
- builds this process's tf.data pipelines (its `data.host_shards` input shards); the data positions of every
  shard are checkpointed and restored, so a resumed run sees the same batches;
- step s trains on `Mixture.kind_at(s)`; the schedule advances once per reference iteration (spec §4.1): once
  per mixture cycle, or `Mixture.iterations_per_cycle()` times with region batches; the optimizer counts its
  updates and steps the schedule every `steps.updates_per_cycle(config)` of them;
- initial parameters: `init.checkpoint` (an official checkpoint or a pre-training run directory; read and checked
  against the model's shapes before anything is written or compiled), the XLM-R + Swin towers (`init.xlmr_dir`,
  `init.swin_path`), CCLM-X2VLM towers (`init.vision_path`, `text_path`, `cross_path`), else random -- each
  placed straight into the run's shardings;
- evaluators: `config.evals` of kind `dev_retrieval` (`run_config`).

`evaluate(config, workdir, step=None)` (`cclm-jax evaluate` with a pre-training config): the run's checkpoint
through every evaluator of `config.evals`, as `finetuning.evaluate` is for a fine-tuned run.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils

from cclm_jax import flops, parallel
from cclm_jax.data.config import resolve_host_shards
from cclm_jax.data.mixture import Mixture
from cclm_jax.data.pipeline import build_host_pipelines, load_tokenizer
from cclm_jax.interop.shapes import abstract_params
from cclm_jax.interop.workdir import read_run_config, restore_params
from cclm_jax.models import build_model
from cclm_jax.optimizer import make_optimizer
from cclm_jax.run_config import resolve_vocab, validate_run_config
from cclm_jax.tasks.start import check_tree
from cclm_jax.train import console, trainer
from cclm_jax.train.steps import StepConfig, clamp_temperature, pretraining_losses, updates_per_cycle

log = logging.getLogger(__name__)


def load_start_params(config: ml_collections.ConfigDict):
    """The parameters `init.checkpoint` names (an official `.th` / `.safetensors` file or a pre-training run
    directory), checked against the shapes of `config.model`'s parameters (`jax.eval_shape` of its init: nothing
    is compiled) before anything is written; ValueError naming the first key that differs, with both shapes."""
    path = os.path.expanduser(config.init.checkpoint)
    if os.path.isdir(path):
        saved = read_run_config(path)
        if saved.get("task"):
            raise ValueError(f"config.init.checkpoint: {path} is a {saved.task!r} fine-tuning run; pre-training "
                             "starts from a pre-training run directory or an official CCLM checkpoint")
        _, params = restore_params(path)
    else:
        from cclm_jax.interop import official

        _, params = official.load(path, text_num_heads=config.init.text_num_heads or None)
    check_tree(params, nn.meta.unbox(abstract_params(config.model, "pretrain")),
               f"the parameters of config.init.checkpoint ({path}; the model is config.model with the vocabulary "
               "of config.data.tokenizer)", model="the model")
    return params


def initial_params(config: ml_collections.ConfigDict, mesh, shardings, rng: jax.Array, start=None):
    """Parameters of a fresh run in `shardings`: `start` (`load_start_params`), the XLM-R + Swin towers, or random
    (drawn directly in their shardings, never materialised on one device)."""
    init = config.init
    if start is not None:
        return parallel.shard_params(start, shardings)
    if any(init.get(k) for k in ("vision_path", "text_path", "cross_path")):
        from cclm_jax.interop.pretrained import init_towers_from_hf

        towers, _ = init_towers_from_hf(config.model, rng, vision=init.vision_path or None,
                                        text=init.text_path or None, cross=init.cross_path or None)
        return parallel.shard_params(towers, shardings)
    if init.xlmr_dir:
        from cclm_jax.interop.pretrained import init_from_pretrained

        pretrained, _ = init_from_pretrained(config.model, init.xlmr_dir, init.swin_path, rng)
        return parallel.shard_params(pretrained, shardings)
    params, _ = parallel.init_sharded_params(build_model(config.model), config.model, mesh, rng)
    return params


def gather_data_state(iterators: dict) -> dict:
    """Every input shard's iterator position, `{kind: {"field@shard": value}}` (identical on all hosts).

    Process p holds shards p*k .. p*k+k-1 (`data.host_shards`), so the all-gather lists them in shard order.
    """
    out = {}
    for kind, it in iterators.items():
        states = it.get_state()
        fields = sorted(next(iter(states.values())))
        local = np.array([[int(states[s][f]) for f in fields] for s in sorted(states)], np.int64)
        everyone = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(fields))
        out[kind] = {f"{f}@{shard}": int(everyone[shard, i]) for i, f in enumerate(fields)
                     for shard in range(everyone.shape[0])}
    return out


def restore_iterators(iterators: dict, saved: dict) -> None:
    """Position every shard's iterator from `gather_data_state`'s format."""
    for kind, it in iterators.items():
        if kind not in saved:
            raise ValueError(f"checkpoint has no data position for {kind!r}; it was written by a run "
                             f"with another data.mix")
        by_shard: dict[int, dict] = {}
        for key, value in saved[kind].items():
            field, shard = key.rsplit("@", 1)
            by_shard.setdefault(int(shard), {})[field] = value
        it.set_state(by_shard)


def build_task(config: ml_collections.ConfigDict, workdir: str, resuming: bool) -> trainer.Task:
    """The pre-training task of `config` (see the module docstring)."""
    del workdir  # the trainer restores the state and the data positions
    validate_run_config(config)
    # The input shards as a number (0 = one per process), so config.json says which batches the run draws and a
    # restart on another number of processes reading the same shards is the same run.
    config.data.host_shards = resolve_host_shards(config.data, jax.process_count())
    tokenizer = load_tokenizer(config.data)
    resolve_vocab(config, tokenizer.vocab_size, tokenizer.mask_id)
    start = load_start_params(config) if config.init.checkpoint and not resuming else None
    iterators = build_host_pipelines(config.data, tokenizer, process_index=jax.process_index(),
                                     process_count=jax.process_count())
    mixture = Mixture(dict(config.data.mix))
    console.progress.info("process %d of %d reads input shards %s", jax.process_index(), jax.process_count(),
                          sorted(next(iter(iterators.values())).shards))
    joint = config.train.mode == "joint"
    step_config = StepConfig(config.model, config.objectives, dropout=config.train.dropout)

    def mesh_losses(mesh):
        return pretraining_losses(dataclasses.replace(step_config, mesh=mesh), config.train.mode,
                                  tuple(mixture.kinds))

    def next_batches(step: int):
        kinds = tuple(iterators) if joint else (mixture.kind_at(step),)
        batches = {k: next(iterators[k]) for k in kinds}
        return ("joint" if joint else kinds[0]), batches, {k: int(b["text_ids"].shape[0]) for k, b in batches.items()}

    def start_inputs(step: int, saved: dict | None) -> None:
        if saved is not None:
            restore_iterators(iterators, saved)

    def input_metrics() -> dict[str, float]:
        out: dict[str, float] = {}
        for it in iterators.values():
            out.update({k: float(v) for k, v in it.metrics().items()})
        return out

    evaluators = trainer.evaluators_from_config(config.evals, eval_makers(config, tokenizer))

    return trainer.Task(
        name="pretrain",
        abstract_params=abstract_params(config.model, "pretrain"),
        initial_params=lambda mesh, shardings, rng: initial_params(config, mesh, shardings, rng, start),
        make_optimizer=lambda params: make_optimizer(config.optimizer, config.schedule, params,
                                                     updates_per_cycle(config)),
        losses=mesh_losses,
        total_steps=int(config.train.num_steps),
        next_batches=next_batches,
        start_inputs=start_inputs,
        data_state=lambda: gather_data_state(iterators),
        input_metrics=input_metrics,
        prepare_params=clamp_temperature,
        flop_per_example=flops.run_model_flops(config),
        kind_prefix=True,
        evaluators=evaluators,
    )


def eval_makers(config: ml_collections.ConfigDict, tokenizer) -> dict:
    """The evaluator kinds of pre-training (`config.evals`): {kind: (name, spec) -> fn(params, step)}."""

    def make_dev_retrieval(name: str, spec) -> Callable:
        from cclm_jax.evaluation.dev import dev_retrieval

        k_test = spec.get("k_test", 16)
        if isinstance(k_test, bool) or not isinstance(k_test, int) or k_test < 0:
            raise ValueError(f"config.evals.{name}.k_test must be a non-negative integer, got {k_test!r}")
        return lambda params, step: dev_retrieval(config, params, parallel.make_mesh(config.mesh), tokenizer, k_test)

    def make_grounding(name: str, spec) -> Callable:
        from cclm_jax.data.demo import DemoSpec, prepare_demo
        from cclm_jax.evaluation.grounding import make_grounding

        def demo_val_path() -> str:
            root = os.path.join(os.path.expanduser(config.data.data_dir), "demo")
            return prepare_demo(root, DemoSpec(**config.data.demo.to_dict()))["region_val"]

        return make_grounding(config.data, config.model, name, spec, tokenizer, demo_val_path)

    return {"dev_retrieval": make_dev_retrieval, "grounding": make_grounding}


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Run or resume pre-training (`cclm-jax train`); returns the final metrics."""
    return trainer.run(config, workdir, build_task)


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
             out: str | None = None) -> dict[str, float]:
    """A run's checkpoint (latest by default) through the evaluators of `config.evals` (every one, whatever its
    `every`, except -1), written under `workdir/eval/step_<N>/` (or into `out`); {evaluator/metric: value}."""
    from cclm_jax.evaluation import report

    run_config, params = restore_params(workdir, step)
    config.model = run_config.model
    tokenizer = load_tokenizer(config.data)
    resolve_vocab(config, tokenizer.vocab_size, tokenizer.mask_id)
    evaluators = trainer.evaluators_from_config(config.evals, eval_makers(config, tokenizer))
    if not evaluators:
        raise ValueError("config.evals enables no evaluator (every=-1 for all): enable one, e.g. "
                         "--config.evals.dev.every=0")
    tables, results = {}, {}
    for evaluator in evaluators:
        metrics = evaluator.fn(params, step)
        results.update({f"{evaluator.name}/{k}": v for k, v in metrics.items()})
        by_language = tables.setdefault(evaluator.name, {})
        for key, value in metrics.items():
            if "/" in key:
                lang, name = key.split("/", 1)
                by_language.setdefault(lang, {})[name] = value
    out_dir = os.path.abspath(os.path.expanduser(out)) if out else os.path.join(
        os.path.abspath(os.path.expanduser(workdir)), "eval", f"step_{step if step is not None else 'latest'}")
    report.write_results(tables, out_dir)
    return results
