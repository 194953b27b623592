"""The fine-tuning program (`cclm-jax finetune`) and the evaluation of a fine-tuned run (`cclm-jax evaluate`).

`finetune(config, workdir)` runs (or resumes) one fine-tuning run of `config.task`:
1. validates the config, reads and checks every annotation file and image (`finetune_data`), loads the
   tokenizer and the starting parameters (`finetune_init`) -- all before anything compiles;
2. writes the resolved config (the run's model config and tokenizer included) to `workdir/config.json`;
3. trains `train.epochs` x ceil(N / train.batch_size) jitted steps (`finetune.make_train_step`, parameters and
   optimizer state sharded over `config.mesh`) on the batches of `finetune_input.TrainBatches`, saving
   checkpoints every `train.checkpoint_every` steps, at the end and on SIGTERM / preemption notices; a run
   restarted on the same workdir resumes from its latest checkpoint and sees the same batches;
4. evaluates the test sets after every epoch from `eval.start_epoch` on (`workdir/eval/epoch_<e>/`) and, at the
   end, writes the report (`results.json`, `results.md`, a PNG chart per task; `evaluation.report`) into the
   workdir. The report's task key is `finetune_data.report_name` (e.g. `xvnli`, `xflickrco_translate_test`);
   re-ranked retrieval adds its dual-encoder recalls under `<key>_itc`; results of other keys already in
   `workdir/results.json` are kept.

`evaluate(config, workdir, step=None)` evaluates a fine-tuned run's checkpoint (latest by default) on the test
sets `config` names (e.g. the translate-test files after zero-shot fine-tuning) and adds them to its report.

Metrics: `workdir/metrics.jsonl` and TensorBoard event files (losses, accuracy, lr, norms, steps/s).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from cclm_jax import parallel
from cclm_jax.checkpoint import Checkpointer, PreemptionWatcher, abstract_like
from cclm_jax.data.tokenizer import Tokenizer
from cclm_jax.evaluation import report
from cclm_jax.evaluation.finetune_eval import TaskEvaluator
from cclm_jax.interop.workdir import read_run_config, restore_params
from cclm_jax.train import finetune as finetune_lib
from cclm_jax.train import finetune_init
from cclm_jax.train.finetune_data import load_task_data, report_name
from cclm_jax.train.finetune_input import TrainBatches
from cclm_jax.train.metrics import ScalarSink
from cclm_jax.train.state import create_train_state

log = logging.getLogger(__name__)

TEXT_FIELDS = ("max_answers", "answer_tokens")  # xGQA training fields besides max_tokens / max_words


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Everything about the config that can be checked without reading data or compiling."""
    finetune_lib.validate_finetune_config(config)
    finetune_init.validate_init(config.init)
    n = num_devices if num_devices is not None else jax.device_count()
    data, fsdp, _ = parallel.mesh_shape(config.mesh, n)
    shards = data * fsdp
    for section in ("train", "eval"):
        if config[section].batch_size % shards:
            raise ValueError(f"config.{section}.batch_size {config[section].batch_size} is not divisible by the "
                             f"{shards} batch shards (mesh data x fsdp = {data} x {fsdp})")
    if (config.task == "retrieval" and config.objectives.negatives == "local"
            and config.train.batch_size // shards < 2):
        raise ValueError(f"config.train.batch_size: ITM negatives are drawn within each of the {shards} batch "
                         f"shards, which needs >= 2 examples per shard (or config.objectives.negatives='global')")


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def write_report(tables: dict[str, dict[str, dict[str, float]]], out_dir: str) -> None:
    """Add the tables ({name: {language: metrics}}) to the report in `out_dir` (other tables there are kept)."""
    if jax.process_index() != 0:
        return
    merged = {}
    if os.path.isfile(os.path.join(out_dir, "results.json")):
        merged = report.read_results(out_dir)
    merged.update(tables)
    report.write_results(merged, out_dir)


def _run_kind(saved: ml_collections.ConfigDict) -> str:
    return f"a {saved.task!r} fine-tuning run" if saved.get("task") else "a pre-training run"


def _resolve(config: ml_collections.ConfigDict, workdir: str, resuming: bool, rng: jax.Array):
    """(tokenizer, host task params; None when resuming), with `config.model` and `config.data.tokenizer` set to
    the run's own (those of `workdir/config.json` when it resumes)."""
    if resuming:
        saved = read_run_config(workdir)
        if saved.get("task") != config.task:
            raise ValueError(f"{workdir} holds {_run_kind(saved)}, not a {config.task!r} fine-tuning run: "
                             "fine-tune into a new directory")
        config.model = saved.model
        config.data.tokenizer = saved.data.tokenizer
        return Tokenizer(saved.data.tokenizer), None
    tokenizer = finetune_init.load_tokenizer(config)
    if config.init.from_scratch:
        if config.model.text.vocab_size == -1:
            config.model.text.update(vocab_size=tokenizer.vocab_size, mask_token_id=tokenizer.mask_id)
        finetune_init.check_vocab(config.model, tokenizer)  # before the random init compiles
    model_config, params = finetune_init.initial_task_params(config, rng)
    finetune_init.check_vocab(model_config, tokenizer)
    config.model = model_config
    config.data.tokenizer = str(tokenizer.model_path)
    return tokenizer, params


def _text_options(config: ml_collections.ConfigDict) -> dict[str, int]:
    out = {"max_tokens": int(config.data.max_tokens), "max_words": int(config.data.max_words)}
    if config.task == "xgqa":
        out.update({k: int(config.data[k]) for k in TEXT_FIELDS})
    return out


class _Metrics:
    """Training measurements: fetched every `log_every` steps, averaged, written to TensorBoard,
    `metrics.jsonl` and the log (process 0)."""

    def __init__(self, workdir: str, total_steps: int):
        self.sink = ScalarSink(workdir)
        self.is_writer = self.sink.is_writer
        self.total, self.pending, self.t_last = total_steps, [], time.time()

    def record(self, step_metrics: dict) -> None:
        self.pending.append(step_metrics)

    def flush(self, step: int) -> dict[str, float]:
        fetched = jax.device_get(self.pending)
        scalars = {f"train/{k}": float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        scalars["train/seconds_per_step"] = (time.time() - self.t_last) / len(fetched)
        self.write(step, scalars)
        if self.is_writer:
            shown = " ".join(f"{k[6:]}={v:.4f}" for k, v in scalars.items()
                             if k[6:] in ("loss", "itc", "itm", "ce", "accuracy", "answer"))
            log.info("step %d/%d  %s  %.2fs/step", step, self.total, shown, scalars["train/seconds_per_step"])
        self.pending, self.t_last = [], time.time()
        return scalars

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.sink.write(step, scalars)

    def close(self) -> None:
        self.sink.close()


def _flat_results(tables: dict[str, dict[str, dict[str, float]]], main: str) -> dict[str, float]:
    """Metric names of the evaluation tables: `test/<lang>/<metric>` for the run's own table `main`, and
    `test<suffix>/<lang>/<metric>` for `main<suffix>` (`test_itc/...`: the dual-encoder recalls)."""
    return {f"test{table[len(main):]}/{lang}/{metric}": value for table, results in tables.items()
            for lang, values in results.items() for metric, value in values.items()}


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Run or resume fine-tuning (see the module docstring); returns {"results": {language: metrics},
    "tables": {report key: {language: metrics}}, ...}."""
    if config.distributed:
        jax.distributed.initialize()
    validate(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    t_start = time.time()
    data = load_task_data(config)
    checkpointer = Checkpointer(workdir, every=config.train.checkpoint_every, keep=config.train.keep_checkpoints)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.train.seed))
    resuming = checkpointer.latest_step() is not None
    tokenizer, host_params = _resolve(config, workdir, resuming, init_rng)
    _write_config(config, workdir)

    mesh = parallel.make_mesh(config.mesh)
    schedule = finetune_lib.finetune_schedule(config.train, len(data.train))
    abstract = finetune_init.abstract_task_params(config.task, config.model)
    shardings = parallel.param_shardings(abstract, mesh)
    if resuming:  # placeholders in the right shardings, replaced by the checkpoint
        shapes = nn.meta.unbox(abstract)
        params = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes),
                         out_shardings=shardings)()
    else:
        params = parallel.shard_params(host_params, shardings)
        del host_params
    optimizer = finetune_lib.make_task_optimizer(config, schedule, params)
    state = jax.jit(lambda p, r: create_train_state(p, optimizer, r))(params, state_rng)
    del params
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    if resuming:
        target = abstract_like(state)
        del state
        state, _ = checkpointer.restore(target)
        log.info("resumed from step %d in %s", checkpointer.latest_step(), checkpointer.directory)

    train_step = finetune_lib.make_train_step(config, optimizer, schedule, mesh=mesh,
                                              state_shardings=state_shardings,
                                              batch_sharding=parallel.batch_sharding(mesh))
    inputs = TrainBatches(config.task, data.train, tokenizer, global_batch=config.train.batch_size,
                          image_res=config.model.vision.image_res, seed=config.train.seed,
                          augment=config.data.augment, process_index=jax.process_index(),
                          process_count=jax.process_count(), **_text_options(config))
    evaluator = TaskEvaluator(config, config.model, data.tests, tokenizer, mesh, answers=data.answers)
    total, per_epoch = schedule.total_steps, inputs.steps_per_epoch
    step = int(jax.device_get(state.step))
    log.info("%s: %d training examples, %d steps (%d epochs of %d), from step %d", report_name(config),
             len(data.train), total, config.train.epochs, per_epoch, step)
    writer = _Metrics(workdir, total)
    out: dict[str, Any] = {}
    batches = inputs.batches(step)
    with PreemptionWatcher() as watcher:
        while step < total:
            batch = parallel.host_batch_to_global(next(batches), mesh)
            state, step_metrics = train_step(state, batch)
            writer.record(step_metrics)
            step += 1
            if step % config.train.log_every == 0 or step == total:
                out.update(writer.flush(step))
            preempted = watcher.requested or checkpointer.reached_preemption(step)
            if preempted or step == total or checkpointer.manager.should_save(step):
                checkpointer.save(step, state, {}, force=preempted or step == total)
            if preempted:
                checkpointer.close()
                writer.close()
                log.warning("preemption requested: saved step %d, exiting", step)
                return {**out, "preempted_at": step}
            epoch = step // per_epoch - 1
            if step % per_epoch == 0 and step < total and epoch >= config.eval.start_epoch:
                tables = evaluator(state.params)
                write_report(tables, os.path.join(workdir, "eval", f"epoch_{epoch}"))
                writer.write(step, _flat_results(tables, evaluator.name))
    checkpointer.close()
    tables = evaluator(state.params)
    write_report(tables, os.path.join(workdir, "eval", f"epoch_{config.train.epochs - 1}"))
    write_report(tables, workdir)
    writer.write(step, _flat_results(tables, evaluator.name))
    writer.close()
    log.info("%s results written to %s", ", ".join(tables), os.path.join(workdir, "results.md"))
    return {**out, "results": tables[evaluator.name], "tables": tables, "seconds": time.time() - t_start}


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict[str, Any]:
    """Test-set results of a fine-tuned run's checkpoint (`step`, default the latest), added to its report."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    saved = read_run_config(workdir)
    if saved.get("task") != config.task:
        raise ValueError(f"{workdir} holds {_run_kind(saved)} (config.json), not a {config.task!r} fine-tuning "
                         "run: evaluate it with its own task's config")
    finetune_lib.validate_finetune_config(config)
    data = load_task_data(config, train=False)
    model_config = saved.model
    config.model = model_config
    tokenizer_path = config.data.tokenizer or saved.data.get("tokenizer")
    if not tokenizer_path:
        raise ValueError(f"config.data.tokenizer is not set and {workdir}/config.json names no tokenizer")
    tokenizer = Tokenizer(tokenizer_path)
    finetune_init.check_vocab(model_config, tokenizer)
    checkpointer = Checkpointer(workdir, every=1, keep=1_000_000)
    step = checkpointer.latest_step() if step is None else step
    checkpointer.close()
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {checkpointer.directory}")
    _, params = restore_params(workdir, step)
    mesh = parallel.make_mesh(config.mesh)
    shardings = parallel.param_shardings(finetune_init.abstract_task_params(config.task, model_config), mesh)
    params = parallel.shard_params(params, shardings)
    evaluator = TaskEvaluator(config, model_config, data.tests, tokenizer, mesh, answers=data.answers)
    tables = evaluator(params)
    write_report(tables, workdir)
    return {"step": step, "results": tables[evaluator.name], "tables": tables}
