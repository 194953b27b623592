"""The training loop: config -> mesh, data, model, sharded state -> jitted steps -> metrics and checkpoints.

Only this module knows about every part. One call, `train(config, workdir)`, runs (or resumes) a run:
- validates the config before anything compiles, writes the resolved config to `workdir/config.json`;
- builds the mesh, this process's tf.data pipelines (its `data.host_shards` input shards), the model and
  its parameters born sharded (random, an imported official checkpoint, or the XLM-R + Swin initialisation);
- resumes from the newest complete checkpoint in the workdir (state, RNG, data positions of every shard);
- follows the fixed-ratio mixture: step s trains on `mixture.kind_at(s)` (or both kinds in `joint` mode);
- fetches metrics from the device only at log steps; saves at the configured interval, on SIGTERM and
  on Orbax's preemption notice, then exits cleanly; evaluates dev retrieval at the end (and periodically).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from cclm_jax import parallel
from cclm_jax.checkpoint import Checkpointer, PreemptionWatcher, abstract_like
from cclm_jax.data.mixture import Mixture
from cclm_jax.data.pipeline import build_host_pipelines, load_tokenizer
from cclm_jax.models import build_model
from cclm_jax.run_config import resolve_vocab, validate_run_config
from cclm_jax.train import metrics as metrics_lib
from cclm_jax.train.optimizer import make_optimizer
from cclm_jax.train.state import TrainState, create_train_state
from cclm_jax.train.steps import StepConfig, make_train_steps

log = logging.getLogger(__name__)


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """`jax.distributed.initialize()` for multi-host runs (auto-detects TPU pods and SLURM; otherwise reads
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)."""
    if not config.distributed:
        return
    kwargs = {}
    if "JAX_NUM_PROCESSES" in os.environ:
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in os.environ:
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
    jax.distributed.initialize(**kwargs)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def initial_params(config: ml_collections.ConfigDict, mesh, rng: jax.Array):
    """Parameters in their shardings: imported (`init.checkpoint` / XLM-R + Swin) or random."""
    model = build_model(config.model)
    params, shardings = parallel.init_sharded_params(model, config.model, mesh, rng)
    init = config.init
    if init.checkpoint:
        from cclm_jax.interop import official

        _, imported = official.load(init.checkpoint, text_num_heads=init.text_num_heads)
        params = parallel.shard_params(imported, shardings)
    elif init.xlmr_dir:
        from cclm_jax.interop.pretrained import init_from_pretrained

        pretrained, _ = init_from_pretrained(config.model, init.xlmr_dir, init.swin_path, rng)
        params = parallel.shard_params(pretrained, shardings)
    return params, shardings


def _gather_data_state(iterators: dict) -> dict:
    """Every input shard's iterator position: {kind: {field: [value per shard]}} (identical on all hosts).

    Process p holds shards p*k .. p*k+k-1 (`data.host_shards`), so the all-gather lists them in shard order.
    """
    out = {}
    for kind, it in iterators.items():
        states = it.get_state()
        fields = sorted(next(iter(states.values())))
        local = np.array([[int(states[s][f]) for f in fields] for s in sorted(states)], np.int64)
        everyone = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(fields))
        out[kind] = {f: everyone[:, i].tolist() for i, f in enumerate(fields)}
    return out


def _flatten_for_json(data_state: dict) -> dict:
    """Orbax JsonSave wants flat ints per field: encode per-shard lists as 'field@shard'."""
    return {kind: {f"{f}@{shard}": v for f, values in fields.items() for shard, v in enumerate(values)}
            for kind, fields in data_state.items()}


def _restore_iterators(iterators: dict, saved: dict) -> None:
    for kind, it in iterators.items():
        if kind not in saved:
            raise ValueError(f"checkpoint has no data position for {kind!r}; it was written by a run "
                             f"with another data.mix")
        by_shard: dict[int, dict] = {}
        for key, value in saved[kind].items():
            field, shard = key.rsplit("@", 1)
            by_shard.setdefault(int(shard), {})[field] = value
        it.set_state(by_shard)


def _batches_for(kind: str, mode: str, iterators: dict) -> tuple[dict, dict]:
    kinds = tuple(iterators) if mode == "joint" else (kind,)
    batches = {k: next(iterators[k]) for k in kinds}
    return batches, {k: int(b["text_ids"].shape[0]) for k, b in batches.items()}


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Run or resume training; returns the final metrics (last logged training values and evaluation)."""
    maybe_initialize_distributed(config)
    validate_run_config(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    t_start = time.time()
    tokenizer = load_tokenizer(config.data)
    resolve_vocab(config, tokenizer.vocab_size, tokenizer.mask_id)
    write_config(config, workdir)

    mesh = parallel.make_mesh(config.mesh)
    iterators = build_host_pipelines(config.data, tokenizer, process_index=jax.process_index(),
                                     process_count=jax.process_count())
    mixture = Mixture(dict(config.data.mix))
    log.info("process %d of %d reads input shards %s", jax.process_index(), jax.process_count(),
             sorted(next(iter(iterators.values())).shards))

    rng = jax.random.PRNGKey(config.train.seed)
    init_rng, state_rng = jax.random.split(rng)
    params, _ = initial_params(config, mesh, init_rng)
    optimizer = make_optimizer(config.optimizer, config.schedule, params, config.model)
    state = jax.jit(lambda p, r: create_train_state(p, optimizer, r))(params, state_rng)
    del params
    state_shardings = jax.tree.map(lambda x: x.sharding, state)

    checkpointer = Checkpointer(workdir, every=config.train.checkpoint_every, keep=config.train.keep_checkpoints,
                                keep_every=config.train.keep_every)
    if checkpointer.latest_step() is not None:
        resume_step = checkpointer.latest_step()
        state, saved_data = checkpointer.restore(abstract_like(state, state_shardings), resume_step)
        _restore_iterators(iterators, saved_data)
        log.info("resumed from step %d in %s", resume_step, checkpointer.directory)

    updates_per_cycle = 1 if config.train.mode == "joint" else len(mixture.cycle)
    step_config = StepConfig(config.model, config.objectives, config.optimizer, config.schedule,
                             updates_per_cycle, mesh, config.train.dropout)
    steps = make_train_steps(step_config, optimizer, config.train.mode, state_shardings,
                             parallel.batch_sharding(mesh))
    writer = metrics_lib.MetricsWriter(workdir, config)
    start = int(jax.device_get(state.step))
    final: dict[str, Any] = {}
    with PreemptionWatcher() as watcher:
        step = start
        while step < config.train.num_steps:
            kind = "joint" if config.train.mode == "joint" else mixture.kind_at(step)
            t0 = time.time()
            host_batches, sizes = _batches_for(kind, config.train.mode, iterators)
            batches = {k: parallel.host_batch_to_global(b, mesh) for k, b in host_batches.items()}
            t1 = time.time()
            _maybe_profile(config, workdir, step, start)
            state, step_metrics = steps[kind](state, batches)
            writer.record(kind, step_metrics, sizes, input_seconds=t1 - t0)
            step += 1
            if step % config.train.log_every == 0 or step == config.train.num_steps:
                final.update(writer.flush(step, state, iterators))
                if config.train.nonfinite == "stop" and int(jax.device_get(state.nonfinite)) > 0:
                    _save(checkpointer, step, state, iterators, force=True)
                    raise FloatingPointError(f"non-finite loss or gradient before step {step} "
                                             f"(config.train.nonfinite='stop'); last good state saved")
            preempted = watcher.requested or checkpointer.reached_preemption(step)
            _save(checkpointer, step, state, iterators, force=preempted or step == config.train.num_steps)
            if preempted:
                checkpointer.close()
                log.warning("preemption requested: saved step %d, exiting", step)
                writer.close()
                return {**final, "preempted_at": step}
    checkpointer.close()
    if config.train.eval_every >= 0:
        final.update(evaluate_dev(config, state.params, mesh, tokenizer, writer, step))
    writer.close()
    final["train_seconds"] = time.time() - t_start
    return final


def _save(checkpointer: Checkpointer, step: int, state: TrainState, iterators: dict, *, force: bool) -> None:
    if force or checkpointer.manager.should_save(step):
        checkpointer.save(step, state, _flatten_for_json(_gather_data_state(iterators)), force=force)


def _maybe_profile(config: ml_collections.ConfigDict, workdir: str, step: int, start: int) -> None:
    t = config.train
    if not t.profile_steps:
        return
    first = max(t.profile_start, start)
    if step == first:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
    elif step == first + t.profile_steps:
        jax.profiler.stop_trace()


def evaluate_dev(config: ml_collections.ConfigDict, params, mesh, tokenizer, writer, step: int) -> dict:
    """Dev retrieval (image->text, text->image, cross-lingual text->text R@1) written as metrics."""
    from cclm_jax.evaluation.dev import dev_retrieval

    results = dev_retrieval(config, params, mesh, tokenizer)
    writer.write_eval(step, results)
    return results
