"""The one trainer of every run: pre-training (`cclm-jax train`) and each fine-tuning task (`cclm-jax finetune`).

`run(config, workdir, build_task)` does, in this order and for every kind of run:
1. `jax.distributed.initialize` for multi-host runs (`maybe_initialize_distributed`);
2. looks at the workdir: a run resumes when it holds a checkpoint; the config must then agree with the run's own
   `config.json` on everything that decides the batches and the numbers (`run_directory.check_same_run`), before
   anything is written;
3. `build_task(config, workdir, resuming)` -> a `Task`: everything that differs between pre-training and a
   fine-tuning task (model, parameters, loss per update kind, batches, schedule, evaluators); it validates
   the config and reads the data before anything compiles;
4. writes the resolved config; builds the mesh, the state's shardings from `jax.eval_shape` (parameters by their
   logical axes, AdamW moments like their parameters) and the state: restored from the newest readable checkpoint
   into those shardings (no random init first; an earlier version's optimizer state is converted,
   `optimizer.upgrade_legacy_state`), else from the task's initial parameters (`init.workdir` /
   `init.checkpoint` > pre-trained towers > random, the task decides);
5. one jitted, donated update per update kind (`steps.make_update_fn`: the same update for every run);
6. the loop: batches of step s (`Task.next_batches`), metrics every `train.log_every` steps (one writer for every
   run), evaluators every `every` steps and at the end, checkpoints at the configured interval, on SIGTERM /
   Ctrl-C (agreed across processes) and on Orbax's preemption notice; a non-finite update is skipped and counted,
   `train.nonfinite='stop'` saves the last good state and stops, and `train.max_consecutive_skips` skipped
   updates in a row stop the run with an error (blown-up weights);
7. `Task.finish` (reports) and the final metrics.

Exit codes (`cclm-jax`): 0 when the run finished or was preempted and saved (the scheduler restarts it; the run
resumes where it stopped), non-zero for errors, including a 'stop' on non-finite updates.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from cclm_jax import parallel
from cclm_jax.checkpoint import Checkpointer, PreemptionWatcher, abstract_like
from cclm_jax.optimizer import upgrade_legacy_state
from cclm_jax.train import console, run_directory
from cclm_jax.train import metrics as metrics_lib
from cclm_jax.train.steps import jit_step, make_update_fn
from cclm_jax.train_state import TrainState, create_train_state

log = logging.getLogger(__name__)

EVERY_UNITS = ("steps", "epochs")  # what an evaluator's `every` counts


@dataclasses.dataclass
class Evaluator:
    """An evaluation run every `every` steps (0: none during the run) and, with `at_end`, after the last step.

    `fn(params, step) -> {metric name: value}` (written to the run's metrics as `eval/<name>/<metric name>`;
    `fn` may also write reports). Built from `config.evals` by `evaluators_from_config`."""

    name: str
    every: int
    fn: Callable[[Any, int], Mapping[str, float]]
    at_end: bool = True


@dataclasses.dataclass
class Task:
    """What differs between pre-training and a fine-tuning task; the trainer does the rest.

    name: 'pretrain' or the fine-tuning task (logs).
    abstract_params: boxed (`nn.LogicallyPartitioned`) ShapeDtypeStructs of the parameters (their shardings).
    initial_params(mesh, shardings, rng): parameters of a fresh run, placed in `shardings`.
    make_optimizer(abstract params) -> the optax transformation (`optimizer.make_optimizer`: it holds the schedule).
    losses(mesh) -> {update kind: `loss_fn(params, batches, rng) -> (total, measurements)`}.
    prepare_params: applied to the parameters before each forward and kept (pre-training's temperature clamp).
    total_steps: optimizer updates in the run.
    next_batches(step) -> (update kind, {batch kind: host batch}, {batch kind: host rows}) for step `step`;
      the loss of that update kind receives the batches as `{batch kind: global batch}`.
    start_inputs(step, saved data positions or None): position the inputs for a run starting at `step`.
    data_state() -> per-kind positions to checkpoint ({} when batches are a function of the step).
    input_metrics() -> scalars of the input pipelines (skip counters), written at log steps.
    flop_per_example: model FLOPs per example per batch kind (empty: no FLOP rates / MFU).
    kind_prefix: metric names carry the update kind (`train/<kind>/loss`) or not (`train/loss`).
    evaluators: run every `every` steps and (`at_end`) after the last one.
    finish(params, step) -> results: at the end of a complete run (reports); its scalars are written to the
      metrics, everything is merged into the returned results.
    """

    name: str
    abstract_params: Any
    initial_params: Callable[[Mesh, Any, jax.Array], Any]
    make_optimizer: Callable[[Any], optax.GradientTransformation]
    losses: Callable[[Mesh], dict[str, Callable]]
    total_steps: int
    next_batches: Callable[[int], tuple[str, dict, dict[str, int]]]
    start_inputs: Callable[[int, dict | None], None]
    data_state: Callable[[], dict]
    input_metrics: Callable[[], Mapping[str, float]] = dict
    prepare_params: Callable | None = None
    flop_per_example: Mapping[str, float] = dataclasses.field(default_factory=dict)
    kind_prefix: bool = True
    evaluators: list[Evaluator] = dataclasses.field(default_factory=list)
    finish: Callable[[Any, int], dict] | None = None


def validate_evals(evals: Mapping[str, Any], kinds: tuple[str, ...], units: tuple[str, ...] = ("steps",)) -> None:
    """Raise ValueError naming the key for an evaluator spec of `config.evals` the run cannot honour.

    `evals` = {name: {kind, every, unit, ...kind options}} (big_vision's config-driven evaluators): kind is one
    of `kinds` (the run's), every > 0 runs it every `every` units and at the end, 0 at the end only, -1 never;
    unit is one of `units` ('steps' by default; fine-tuning also counts 'epochs')."""
    for name, spec in evals.items():
        where = f"config.evals.{name}"
        if not hasattr(spec, "get") or spec.get("kind") not in kinds:
            got = spec.get("kind") if hasattr(spec, "get") else spec
            raise ValueError(f"{where}.kind must be one of {kinds}, got {got!r}")
        every = spec.get("every", 0)
        if isinstance(every, bool) or not isinstance(every, int) or every < -1:
            raise ValueError(f"{where}.every must be an integer >= -1 (-1 never, 0 at the end only), got {every!r}")
        if spec.get("unit", "steps") not in units:
            raise ValueError(f"{where}.unit must be one of {units}, got {spec.get('unit')!r}")


def evaluators_from_config(evals: Mapping[str, Any], makers: Mapping[str, Callable[[str, Any], Callable]],
                           steps_per_epoch: int = 0, at_end: bool = True) -> list[Evaluator]:
    """The `Evaluator`s of `config.evals` (see `validate_evals`); `makers[kind](name, spec)` builds the kind's
    `fn(params, step) -> metrics`; an evaluator counted in epochs runs every `every * steps_per_epoch` steps."""
    units = ("steps", "epochs") if steps_per_epoch else ("steps",)
    validate_evals(evals, tuple(makers), units)
    out = []
    for name, spec in evals.items():
        if spec.get("every", 0) >= 0:
            per = steps_per_epoch if spec.get("unit", "steps") == "epochs" else 1
            out.append(Evaluator(name, spec.get("every", 0) * per, makers[spec["kind"]](name, spec), at_end))
    return out


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """`jax.distributed.initialize()` for multi-host runs (auto-detects TPU pods and SLURM; otherwise reads
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, as `launch/gpu.sh` exports them)."""
    if not config.get("distributed"):
        return
    kwargs = {}
    if "JAX_NUM_PROCESSES" in os.environ:
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in os.environ:
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
    jax.distributed.initialize(**kwargs)


def make_state(boxed_params: Any, make_optimizer: Callable[[Any], optax.GradientTransformation],
               mesh: Mesh, rng: jax.Array) -> tuple[Any, Any, optax.GradientTransformation]:
    """(abstract state with shardings, state shardings, optimizer) of a run whose parameters are `boxed_params`
    (`nn.LogicallyPartitioned` ShapeDtypeStructs); nothing is allocated (also used by `cclm_jax.aot`)."""
    from flax import linen as nn

    params_shardings = parallel.param_shardings(boxed_params, mesh)
    abstract_params = nn.meta.unbox(boxed_params)
    optimizer = make_optimizer(abstract_params)
    abstract = jax.eval_shape(lambda p, r: create_train_state(p, optimizer, r), abstract_params, rng)
    shardings = parallel.state_shardings(abstract, params_shardings, mesh)
    return abstract_like(abstract, shardings), shardings, optimizer


def agree(flag: bool) -> bool:
    """True on every process when `flag` is true on any (a SIGTERM that reached one host only)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.int32))))


def run(config: ml_collections.ConfigDict, workdir: str,
        build_task: Callable[[ml_collections.ConfigDict, str, bool], Task]) -> dict[str, Any]:
    """Run or resume one run (see the module docstring); returns the final metrics and the task's results."""
    maybe_initialize_distributed(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    t_start = time.time()
    checkpointer = Checkpointer(workdir, every=config.train.checkpoint_every, keep=config.train.keep_checkpoints,
                                keep_every=config.train.keep_every)
    resuming = checkpointer.latest_step() is not None
    task = build_task(config, workdir, resuming)
    run_directory.check_same_run(config, workdir)
    run_directory.write_config(config, workdir)
    log_file = console.log_to_file(workdir, jax.process_index())
    if jax.process_index() == 0:
        console.progress.info("%s: %d steps in %s%s", task.name, task.total_steps, workdir,
                              f" (log: {log_file})" if log_file else "")
        console.progress.info(console.describe_skips(task.input_metrics()))

    mesh = parallel.make_mesh(config.mesh)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.train.seed))
    abstract, shardings, optimizer = make_state(task.abstract_params, task.make_optimizer, mesh, state_rng)
    restored_data, fallbacks = None, []
    if resuming:
        state, restored_data, fallbacks = checkpointer.restore_newest_readable(
            abstract, upgrade_opt_state=upgrade_legacy_state)
        if state.opt_state is None:  # an imported, parameters-only checkpoint: a fresh optimizer state
            opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(state.params)
            state = state.replace(opt_state=opt_state)
        console.progress.info("resumed from step %d (%s)", int(jax.device_get(state.step)), checkpointer.directory)
    else:
        params = task.initial_params(mesh, shardings.params, init_rng)
        state = jax.jit(lambda p, r: create_train_state(p, optimizer, r), out_shardings=shardings)(params, state_rng)
        del params

    batch_sharding = parallel.batch_sharding(mesh)
    steps = {kind: jit_step(make_update_fn(loss_fn, optimizer, prepare_params=task.prepare_params), shardings,
                            batch_sharding)
             for kind, loss_fn in task.losses(mesh).items()}
    step = int(jax.device_get(state.step))
    task.start_inputs(step, restored_data)
    writer = metrics_lib.MetricsWriter(workdir, task.total_steps, task.flop_per_example,
                                       kind_prefix=task.kind_prefix, resume_step=step if resuming else None)
    for bad_step, reason in fallbacks:
        writer.sink.write(step, {"checkpoint/unreadable_step": float(bad_step)})
        log.warning("checkpoint %d was unreadable (%s)", bad_step, reason)
    log.info("%s: %d steps, from step %d", task.name, task.total_steps, step)
    final: dict[str, Any] = {}
    try:
        with PreemptionWatcher() as watcher:
            state, final = _loop(config, workdir, task, state, steps, mesh, checkpointer, writer, watcher, step)
        if "preempted_at" in final:
            return final
        checkpointer.close()
        for evaluator in task.evaluators:
            if evaluator.at_end:
                final.update(_evaluate(evaluator, state.params, task.total_steps, writer))
        if task.finish is not None:
            results = task.finish(state.params, task.total_steps)
            writer.sink.write(task.total_steps, {k: float(v) for k, v in results.items() if np.isscalar(v)})
            final.update(results)
    finally:
        writer.close()
    final["train_seconds"] = time.time() - t_start
    return final


def _loop(config, workdir: str, task: Task, state: TrainState, steps: dict, mesh: Mesh,
          checkpointer: Checkpointer, writer: metrics_lib.MetricsWriter, watcher: PreemptionWatcher,
          step: int) -> tuple[TrainState, dict[str, Any]]:
    """The training steps from `step` to `task.total_steps`; (last state, last metrics)."""
    train = config.train
    max_skips = int(train.max_consecutive_skips)
    final: dict[str, Any] = {}
    start = step
    while step < task.total_steps:
        t0 = time.time()
        kind, host_batches, sizes = task.next_batches(step)
        batches = {k: parallel.host_batch_to_global(b, mesh) for k, b in host_batches.items()}
        t1 = time.time()
        _maybe_profile(train, workdir, step, start)
        state, step_metrics = steps[kind](state, batches)
        writer.record(kind, step_metrics, sizes, input_seconds=t1 - t0)
        step += 1
        if step % train.log_every == 0 or step == task.total_steps:
            scalars = writer.flush(step, state, task.input_metrics())
            final.update(scalars)
            _check_skips(config, checkpointer, task, state, step, scalars, max_skips)
        for evaluator in task.evaluators:
            if evaluator.every > 0 and step % evaluator.every == 0 and step < task.total_steps:
                final.update(_evaluate(evaluator, state.params, step, writer))
        preempted = agree(watcher.requested) or checkpointer.reached_preemption(step)
        last = step == task.total_steps
        if preempted or last or checkpointer.should_save(step):
            checkpointer.save(step, state, task.data_state(), force=preempted or last)
        if preempted:
            checkpointer.close()
            log.warning("preemption requested: saved step %d, exiting (rerun the same command to resume)", step)
            return state, {**final, "preempted_at": step}
    return state, final


def _check_skips(config, checkpointer: Checkpointer, task: Task, state: TrainState, step: int,
                 scalars: Mapping[str, float], max_skips: int) -> None:
    """Stop (after saving the last good state) on `nonfinite='stop'` or too many skipped updates in a row."""
    skipped = sum(v for k, v in scalars.items() if k.endswith("skipped_nonfinite")) > 0
    in_a_row = int(jax.device_get(state.skips))
    stop = config.train.nonfinite == "stop" and skipped
    blown = max_skips > 0 and in_a_row >= max_skips
    if not (stop or blown):
        return
    checkpointer.save(step, state, task.data_state(), force=True)
    checkpointer.close()
    if blown:
        raise FloatingPointError(
            f"{in_a_row} updates in a row before step {step} were skipped as non-finite (loss, gradient or new "
            f"parameters; config.train.max_consecutive_skips={max_skips}): the run has diverged -- lower "
            "optimizer.lr or resume from an earlier checkpoint; the unchanged state was saved at this step")
    raise FloatingPointError(f"a non-finite loss, gradient or parameter before step {step} "
                             "(config.train.nonfinite='stop'); the last good state was saved at this step")


def _evaluate(evaluator: Evaluator, params, step: int, writer: metrics_lib.MetricsWriter) -> dict[str, float]:
    results = writer.exclude(lambda: evaluator.fn(params, step))
    scalars = {f"eval/{evaluator.name}/{k}": float(v) for k, v in results.items() if np.isscalar(v)}
    if scalars:
        writer.sink.write(step, scalars)
        if writer.is_writer:
            console.progress.info("eval %s at step %d: %s", evaluator.name, step,
                                  "  ".join(f"{k}={v:.2f}" for k, v in scalars.items()))
    return scalars


def _maybe_profile(train: ml_collections.ConfigDict, workdir: str, step: int, start: int) -> None:
    if not train.profile_steps:
        return
    first = max(train.profile_start, start)
    if step == first:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
    elif step == first + train.profile_steps:
        jax.profiler.stop_trace()
