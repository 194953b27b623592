"""The fine-tuning program (`cclm-jax finetune`) and the evaluation of a fine-tuned run (`cclm-jax evaluate`).

`finetune(config, workdir)` runs (or resumes) one fine-tuning run of `config.task` through the one trainer
(`train.trainer.run`, which also runs pre-training) with the task `build_task` makes:
1. validates the config, reads and checks every annotation file and image (`data.finetune_data`), loads the
   tokenizer and the starting parameters (`tasks.start`) -- all before anything compiles;
2. the trainer writes the resolved config (the run's model config and tokenizer included) to
   `workdir/config.json` and trains `train.epochs` x ceil(N / train.batch_size) steps of the task loss
   (`tasks.make_loss_fn`) on the batches of `data.finetune_input.TrainBatches` (a function of the step, so a
   restarted run resumes from its latest checkpoint and sees the same batches), with checkpoints, metrics,
   preemption and non-finite handling as for pre-training;
3. runs the evaluators of `config.evals` ({name: {kind: 'test', every, unit, ...}}; default `test`: the
   protocol's test sets after every epoch from `eval.start_epoch` on, into `workdir/eval/epoch_<e>/`, or
   `step_<s>/` when counted in steps) and, at the end, all of them once more for the report (`results.json`,
   `results.md`, a PNG chart per task; `evaluation.report`) in the workdir. An evaluator may test other files
   than the run's: `protocol` ('translate_test': the IGLUE machine-translated files), `test_files` ({language:
   CCLM retrieval json}) and `languages` override the run's `data` for it. A table's key is
   `data.finetune_data.report_name` of the evaluator's settings (e.g. `xvnli`, `xvnli_translate_test`);
   re-ranked retrieval adds its dual-encoder recalls under `<key>_itc`; results of other keys already in
   `workdir/results.json` are kept.

The schedule (`finetune_schedule`), the optimizer (`make_task_optimizer`) and the standalone jitted update
(`make_train_step`) of a task are here; the task itself (config, model, loss, prediction) is in `cclm_jax.tasks`.

`evaluate(config, workdir, step=None, out=None)` evaluates a fine-tuned run's checkpoint (latest by default) on the
test sets `config` names (e.g. the translate-test files after zero-shot fine-tuning, or files under
`data.test_root`) and adds them to its report, or writes them to a report of their own in `out`.

Metrics: `workdir/metrics.jsonl` and TensorBoard event files (`train/<name>`: losses, accuracy, lr, norms,
examples/s, input wait; `eval/<evaluator>/<lang>/<metric>`, `eval/<evaluator>_itc/...` for the dual encoder).
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from cclm_jax import optimizer as optimizer_lib
from cclm_jax import parallel
from cclm_jax.checkpoint import Checkpointer
from cclm_jax.data.finetune_data import load_task_data, report_name
from cclm_jax.data.finetune_input import TrainBatches, row_images
from cclm_jax.data.tokenizer import Tokenizer
from cclm_jax.evaluation import report
from cclm_jax.evaluation.finetune_eval import TaskEvaluator
from cclm_jax.interop.workdir import read_run_config, restore_params
from cclm_jax.tasks import definitions as task_lib
from cclm_jax.tasks import locked_tower
from cclm_jax.tasks import start as task_start
from cclm_jax.train import steps, trainer

log = logging.getLogger(__name__)

TEXT_FIELDS = ("max_answers", "answer_tokens")
LOCKED_TOWER_NO_DECAY = (("vision_encoder/.*", 0.0),)  # xGQA training fields besides max_tokens / max_words


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Everything about the config that can be checked without reading data or compiling."""
    task_lib.validate_finetune_config(config)
    task_start.validate_init(config.init)
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


def finetune_schedule(train_config: ml_collections.ConfigDict, num_train_examples: int) -> ml_collections.ConfigDict:
    """The `schedule` section for a run: epochs x ceil(N / global batch) steps, the first
    `train.warmup_fraction` of them warm-up (the reference's `num_warmup_steps: 0.1`), then linear decay."""
    if num_train_examples <= 0:
        raise ValueError(f"fine-tuning needs training examples, got {num_train_examples}")
    total = int(train_config.epochs) * math.ceil(num_train_examples / int(train_config.batch_size))
    warmup = int(float(train_config.warmup_fraction) * total)
    return ml_collections.ConfigDict({"kind": "linear", "warmup_steps": warmup, "total_steps": total})


def make_task_optimizer(config: ml_collections.ConfigDict, schedule: ml_collections.ConfigDict,
                        params) -> optax.GradientTransformation:
    """`optimizer.make_optimizer` with the run's `optimizer` section (lr 3e-5, lr x2 for the task head) and
    `schedule` (one scheduler step per update). A locked image tower (`model.vision.frozen`) gets no weight decay
    either (`LOCKED_TOWER_NO_DECAY` heads the decay table), so AdamW leaves it bitwise as loaded."""
    optimizer_config = config.optimizer
    if config.model.vision.get("frozen", False) and LOCKED_TOWER_NO_DECAY[0] not in [
            tuple(row) for row in optimizer_config.wd_mults]:
        optimizer_config = ml_collections.ConfigDict(optimizer_config.to_dict())
        optimizer_config.wd_mults = LOCKED_TOWER_NO_DECAY + tuple(optimizer_config.wd_mults)
    return optimizer_lib.make_optimizer(optimizer_config, schedule, params)


def make_train_step(config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation, *,
                    mesh: Mesh | None = None, state_shardings=None, batch_sharding=None) -> Callable:
    """Jitted `step(state, batch) -> (state, metrics)` of `config.task`: `steps.make_update_fn` (the one update
    of every run) with the task loss; the state donated, kept in `state_shardings` when given."""
    update = steps.make_update_fn(task_lib.make_loss_fn(config, mesh), optimizer)
    if state_shardings is None:
        return jax.jit(update, donate_argnums=(0,))
    return steps.jit_step(update, state_shardings, batch_sharding)


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
        return Tokenizer(saved.data.tokenizer, key=f"{workdir}/config.json data.tokenizer"), None
    tokenizer = task_start.load_tokenizer(config)
    if config.init.from_scratch:
        if config.model.text.vocab_size == -1:
            config.model.text.update(vocab_size=tokenizer.vocab_size, mask_token_id=tokenizer.mask_id)
        task_start.check_vocab(config.model, tokenizer)  # before the random init compiles
    model_config, params = task_start.initial_task_params(config, rng)
    task_start.check_vocab(model_config, tokenizer)
    config.model = model_config
    config.data.tokenizer = str(tokenizer.model_path)
    return tokenizer, params


def _text_options(config: ml_collections.ConfigDict) -> dict[str, int]:
    out = {"max_tokens": int(config.data.max_tokens), "max_words": int(config.data.max_words)}
    if config.task == "xgqa":
        out.update({k: int(config.data[k]) for k in TEXT_FIELDS})
    return out


def _flat_results(tables: dict[str, dict[str, dict[str, float]]], main: str, prefix: str) -> dict[str, float]:
    """Metric names of an evaluator's tables: `<prefix><lang>/<metric>` for its own table `main`, and
    `<prefix><suffix>/<lang>/<metric>` for `main_<suffix>` (`itc/...`: the dual-encoder recalls)."""
    return {f"{prefix}{table[len(main) + 1:] + '/' if table != main else ''}{lang}/{metric}": value
            for table, results in tables.items() for lang, values in results.items()
            for metric, value in values.items()}


EVAL_OVERRIDES = ("protocol", "test_files", "languages")  # what a `test` evaluator may set for itself


def _evaluator_config(config: ml_collections.ConfigDict, name: str, spec) -> ml_collections.ConfigDict | None:
    """The config an evaluator of `config.evals` reads its test sets with (None: the run's own)."""
    unknown = sorted(set(spec.keys()) - {"kind", "every", "unit", *EVAL_OVERRIDES})
    if unknown:
        raise ValueError(f"config.evals.{name}: unknown keys {unknown} (a 'test' evaluator takes every, unit and "
                         f"{', '.join(EVAL_OVERRIDES)})")
    if not any(key in spec for key in EVAL_OVERRIDES):
        return None
    own = config.copy_and_resolve_references()
    with own.unlocked():
        own.protocol = spec.get("protocol", config.protocol)
        for key in ("test_files", "languages"):
            if key in spec:
                own.data[key] = spec[key]
    task_lib.validate_finetune_config(own)
    return own


def build_task(config: ml_collections.ConfigDict, workdir: str, resuming: bool) -> trainer.Task:
    """The fine-tuning task of `config` (see the module docstring): validated, data read and checked, tokenizer
    and starting parameters loaded (not when resuming: the trainer restores the run's own), all before anything
    compiles."""
    validate(config)
    data = load_task_data(config)
    init_rng, _ = jax.random.split(jax.random.PRNGKey(config.train.seed))
    tokenizer, host_params = _resolve(config, workdir, resuming, init_rng)
    schedule = finetune_schedule(config.train, len(data.train))
    features = None
    if locked_tower.uses_cached_features(config):
        params = host_params if host_params is not None else restore_params(workdir)[1]  # the tower never changes
        sources = [s for row in data.train for s in row_images(config.task, row)]
        features = locked_tower.encode_training_images(config.model, params, sources,
                                                       image_res=config.model.vision.image_res,
                                                       batch_size=config.eval.batch_size)
    inputs = TrainBatches(config.task, data.train, tokenizer, global_batch=config.train.batch_size,
                          image_res=config.model.vision.image_res, seed=config.train.seed,
                          augment=config.data.augment, process_index=jax.process_index(),
                          process_count=jax.process_count(), image_features=features, **_text_options(config))
    per_epoch = inputs.steps_per_epoch
    log.info("%s: %d training examples, %d steps (%d epochs of %d)", report_name(config), len(data.train),
             schedule.total_steps, config.train.epochs, per_epoch)
    mesh = parallel.make_mesh(config.mesh)
    trainer.validate_evals(config.evals, ("test",), trainer.EVERY_UNITS)
    evaluators = {}  # name -> TaskEvaluator: every test set is read and checked before anything compiles
    for name, spec in config.evals.items():
        if spec.get("every", 0) < 0:
            continue
        own = _evaluator_config(config, name, spec)
        tests = data if own is None else load_task_data(own, train=False)
        evaluators[name] = TaskEvaluator(own or config, config.model, tests.tests, tokenizer, mesh,
                                         answers=tests.answers)
    task, batches = config.task, iter(())

    def initial_params(mesh, shardings, rng):
        del mesh, rng  # drawn by `_resolve` (new heads from train.seed)
        return parallel.shard_params(host_params, shardings)

    def losses(mesh):
        loss_fn = task_lib.make_loss_fn(config, mesh)
        return {task: lambda params, batches, rng: loss_fn(params, batches[task], rng)}

    def start_inputs(step: int, saved: dict | None) -> None:
        nonlocal batches
        del saved  # batches are a function of the step
        batches = inputs.batches(step)

    def next_batches(step: int):
        del step
        batch = next(batches)
        return task, {task: batch}, {task: int(batch["text_ids"].shape[0])}

    def make_eval(name: str, spec) -> Callable:
        def periodic(params, step: int) -> dict[str, float]:
            epoch = step // per_epoch - 1
            if epoch < config.eval.start_epoch:
                return {}
            tables = evaluators[name](params)
            by_epoch = spec.get("unit", "steps") == "epochs"
            write_report(tables, os.path.join(workdir, "eval", f"epoch_{epoch}" if by_epoch else f"step_{step}"))
            return _flat_results(tables, evaluators[name].name, prefix="")
        return periodic

    def finish(params, step: int) -> dict[str, Any]:
        tables, scalars = {}, {}
        for name, evaluator in evaluators.items():
            own = evaluator(params)
            tables.update(own)
            scalars.update(_flat_results(own, evaluator.name, prefix=f"eval/{name}/"))
        write_report(tables, os.path.join(workdir, "eval", f"epoch_{config.train.epochs - 1}"))
        write_report(tables, workdir)
        log.info("%s results written to %s", ", ".join(tables), os.path.join(workdir, "results.md"))
        main = evaluators["test"].name if "test" in evaluators else None
        return {"results": tables.get(main, {}), "tables": tables, **scalars}

    return trainer.Task(
        name=report_name(config),
        abstract_params=task_start.abstract_task_params(config.task, config.model),
        initial_params=initial_params,
        make_optimizer=lambda params: make_task_optimizer(config, schedule, params),
        losses=losses,
        total_steps=int(schedule.total_steps),
        next_batches=next_batches,
        start_inputs=start_inputs,
        data_state=dict,
        input_metrics=data.metrics,
        kind_prefix=False,
        evaluators=trainer.evaluators_from_config(config.evals, {"test": make_eval}, per_epoch, at_end=False),
        finish=finish,
    )


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Run or resume fine-tuning (`cclm-jax finetune`, see the module docstring); returns {"results": {language:
    metrics}, "tables": {report key: {language: metrics}}, ...}."""
    return trainer.run(config, workdir, build_task)


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
             out: str | None = None) -> dict[str, Any]:
    """Test-set results of a fine-tuned run's checkpoint (`step`, default the latest), added to its report, or with
    `out` written as a report of their own into that directory (the run directory is then only read)."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    out_dir = os.path.abspath(os.path.expanduser(out)) if out else workdir
    saved = read_run_config(workdir)
    if saved.get("task") != config.task:
        raise ValueError(f"{workdir} holds {_run_kind(saved)} (config.json), not a {config.task!r} fine-tuning "
                         "run: evaluate it with its own task's config")
    task_lib.validate_finetune_config(config)
    data = load_task_data(config, train=False)
    if data.skipped:
        log.warning("test records without their image file were skipped (config.data.skip_missing_images): %s",
                    data.skipped)
    model_config = saved.model
    config.model = model_config
    tokenizer_path = config.data.tokenizer or saved.data.get("tokenizer")
    if not tokenizer_path:
        raise ValueError(f"config.data.tokenizer is not set and {workdir}/config.json names no tokenizer")
    tokenizer = Tokenizer(tokenizer_path, key="config.data.tokenizer")
    task_start.check_vocab(model_config, tokenizer)
    mesh = parallel.make_mesh(config.mesh)
    shardings = parallel.param_shardings(task_start.abstract_task_params(config.task, model_config), mesh)
    checkpointer = Checkpointer(workdir, every=1, keep=1_000_000)
    step = checkpointer.latest_step() if step is None else step
    checkpointer.close()
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {checkpointer.directory}")
    _, params = restore_params(workdir, step, shardings)
    evaluator = TaskEvaluator(config, model_config, data.tests, tokenizer, mesh, answers=data.answers)
    tables = evaluator(params)
    write_report(tables, out_dir)
    return {"step": step, "results": tables[evaluator.name], "tables": tables, "report": out_dir,
            "skipped_missing_images": data.skipped}
