"""The run config: every section with its defaults, and validation that runs before anything compiles.

Sections (each documented where its defaults live):
- `model`: `cclm_jax.models.config` (architecture, dtype, remat).
- `data`: `cclm_jax.data.config` (sources, tokenizer, batch sizes per host, mixture ratios).
- `objectives`: `cclm_jax.objectives.default_objectives_config` (loss weights, negatives, variants).
- `optimizer`, `schedule`: `cclm_jax.optimizer` (reference AdamW, lr groups, warmup/decay).
- `train`: below. `mesh`: `cclm_jax.parallel` ({data, fsdp, tensor}; -1 = remaining devices).
- `init`: where the first parameters come from (below).
- `distributed`: call `jax.distributed.initialize()` first (multi-host TPU pod slices, SLURM, or the
  `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` environment variables).

`train`:
  mode             'alternate' (one optimizer update per batch, kinds interleaved by `data.mix`; the
                   reference) or 'joint' (one update on the sum of both views).
  num_steps        optimizer updates in the run (a resumed run stops at the same total).
  seed             parameter initialisation, dropout and negative sampling.
  dropout          train with dropout / drop-path (the reference does).
  log_every        steps between metric writes (metrics are fetched from the device only then).
  checkpoint_every steps between checkpoints; keep_checkpoints: how many recent ones to keep;
  keep_every       also keep every checkpoint whose step is a multiple of this (0 = none).
  nonfinite        'skip' (count and skip the update) or 'stop' (at the next log step: save the last good
                   state and exit non-zero; a resumed run continues).
  max_consecutive_skips   stop with an error (state saved) when this many updates in a row were skipped as
                   non-finite, checked at log steps (diverged weights; 0 = never).
  profile_start, profile_steps   a jax.profiler trace of `profile_steps` steps from `profile_start`
                   (profile_steps 0 = off), written under workdir/profile.
`evals`: {name: {kind, every, ...}}, the evaluators of the run (`train.trainer.evaluators_from_config`):
  every > 0 runs one every `every` steps and at the end, 0 at the end only, -1 never. Kinds:
  dev_retrieval    retrieval on the dev set `data.eval` names (`evaluation.dev`); k_test: candidates re-ranked
                   by the ITM head (0 = ITC scores only). Metrics `eval/<name>/<lang>/i2t_r1`, ...
  grounding        box-head grounding on held-out region records (`evaluation.grounding`): paths (region
                   json-lines; empty = the demo's region_val.jsonl), image_field, image_root, languages.
                   Metrics `eval/<name>/<lang>/grounding_acc` (IoU >= 0.5, percent), `<lang>/mean_iou`,
                   `chance_mean_box`, `chance_random_shape`.
`init`:
  checkpoint       '' (random init), an official CCLM `.th` (imported), or an Orbax workdir to start from.
  text_num_heads   attention heads of an imported official checkpoint that records none (shapes cannot
                   tell; 0 = not given: 16 for width 1024, 12 for 768). A file's recorded count wins; a
                   different value here is an error.
  xlmr_dir, swin_path   HF XLM-R-large directory and Microsoft Swin `.pth` for the reference
                   pre-training initialisation (both or neither).
  vision_path, text_path, cross_path   CCLM-X2VLM towers from public checkpoints (any subset; the rest random):
                   a BEiT-v2 `.pth` or HF Dinov2Model directory/file, an HF XLMRobertaModel (or BertModel)
                   directory/file, an HF BertModel for the cross encoder (its last `model.cross.num_layers`
                   layers); `interop.pretrained.init_towers_from_hf`.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections

from cclm_jax.data.config import KINDS, default_data_config, resolve_host_shards, validate_data_config
from cclm_jax.models.cclm import is_x2vlm, vision_kind, vision_stride
from cclm_jax.models.config import base_model_config, reference_model_config, validate_model_config
from cclm_jax.objectives import default_objectives_config, validate_objectives_config
from cclm_jax.optimizer import default_optimizer_config, default_schedule_config, validate_optimizer_config

TRAIN_MODES = ("alternate", "joint")


def default_train_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "mode": "alternate", "num_steps": 1000, "seed": 42, "dropout": True, "log_every": 50,
        "checkpoint_every": 500, "keep_checkpoints": 3,
        "keep_every": 0, "nonfinite": "skip", "max_consecutive_skips": 100, "profile_start": 10,
        "profile_steps": 0,
    })


def default_run_config() -> ml_collections.ConfigDict:
    """Every section with defaults (the released architecture, demo data); config files edit a copy."""
    return ml_collections.ConfigDict({
        "model": base_model_config(),
        "data": default_data_config(),
        "objectives": default_objectives_config(),
        "optimizer": default_optimizer_config(),
        "schedule": default_schedule_config(),
        "train": default_train_config(),
        "evals": {"dev": {"kind": "dev_retrieval", "every": 0, "k_test": 16}},
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
        "init": {"checkpoint": "", "text_num_heads": 0, "xlmr_dir": "", "swin_path": "", "vision_path": "",
                 "text_path": "", "cross_path": ""},
        "distributed": False,
    })


def load_config_file(path: str | os.PathLike, arg: str = "") -> ml_collections.ConfigDict:
    """The config `cclm-jax --config <path>:<arg>` runs with: `get_config(arg)` of the Python file at `path`
    (for notebooks and tests; the command line adds its `--config.x=y` overrides on top)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("cclm_config_" + os.path.basename(path).removesuffix(".py"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path!r} defines no get_config(arg) function")
    return module.get_config(arg)


MOVED_KEYS = {"config.train.eval_every": "config.evals.dev.every",
              "config.train.eval_k_test": "config.evals.dev.k_test"}


def _check_keys(cfg: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, where: str) -> list[str]:
    """Unknown keys (typos, or keys that moved: `MOVED_KEYS`) anywhere below `where`, compared with the defaults."""
    errors = []
    for key in cfg.keys():
        if key not in reference:
            moved = MOVED_KEYS.get(f"{where}{key}")
            errors.append(f"{where}{key}: unknown key" + (f" (now {moved})" if moved else ""))
        elif isinstance(cfg[key], ml_collections.ConfigDict) and isinstance(reference[key], ml_collections.ConfigDict):
            if key in ("mix", "weights", "caption_fields", "evals"):  # free-form mappings
                continue
            errors += _check_keys(cfg[key], reference[key], f"{where}{key}.")
    return errors


def validate_run_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise ValueError/FileNotFoundError with one clear line per problem, before any compilation."""
    reference = default_run_config()
    if "model" in config:
        reference.model = reference_model_config(config.model)
    errors = _check_keys(config, reference, "config.")
    for key in default_run_config().keys():
        if key not in config:
            errors.append(f"config.{key}: missing section")
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))
    validate_model_config(config.model)
    validate_data_config(config.data)
    validate_objectives_config(config.objectives)
    validate_optimizer_config(config.optimizer, config.schedule)
    t = config.train
    if t.mode not in TRAIN_MODES:
        raise ValueError(f"config.train.mode must be one of {TRAIN_MODES}, got {t.mode!r}")
    if t.nonfinite not in ("skip", "stop"):
        raise ValueError(f"config.train.nonfinite must be 'skip' or 'stop', got {t.nonfinite!r}")
    value = t.max_consecutive_skips
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"config.train.max_consecutive_skips must be a non-negative integer, got {value!r}")
    for key in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        if t[key] <= 0:
            raise ValueError(f"config.train.{key} must be positive, got {t[key]}")
    for kind in ("image_caption", "eval") + (("region",) if config.data.mix.get("region", 0) > 0 else ()):
        if config.data[kind].image_res != config.model.vision.image_res:
            raise ValueError(f"config.data.{kind}.image_res {config.data[kind].image_res} must equal "
                             f"config.model.vision.image_res {config.model.vision.image_res}")
    if config.data.mix.get("region", 0) > 0:
        stride = vision_stride(config.model)
        if config.data.region.patch_size != stride:
            how = ("model.vision.patch_size" if vision_kind(config.model) == "vit"
                   else "model.vision.patch_size x 2^(stages - 1)")
            raise ValueError(f"config.data.region.patch_size {config.data.region.patch_size} must equal the image "
                             f"tower's total stride {stride} ({how})")
    positions = config.model.text.max_position_embeddings
    for kind in [k for k in KINDS if config.data.mix.get(k, 0) > 0] + ["eval"]:
        if config.data[kind].max_tokens > positions:
            raise ValueError(f"config.data.{kind}.max_tokens {config.data[kind].max_tokens} exceeds "
                             f"config.model.text.max_position_embeddings {positions}: lower max_tokens (or use a "
                             "model with more positions)")
    _check_batch_split(config, num_devices)
    _check_init(config.init)
    towers = [f"config.init.{k}" for k in ("vision_path", "text_path", "cross_path") if config.init.get(k)]
    if towers and not is_x2vlm(config.model):
        raise ValueError(f"{', '.join(towers)}: tower checkpoints initialise a CCLM-X2VLM model (model.cross); "
                         "for CCLM use config.init.xlmr_dir and config.init.swin_path")
    if config.init.xlmr_dir and is_x2vlm(config.model):
        raise ValueError("config.init.xlmr_dir / swin_path initialise CCLM; for CCLM-X2VLM use "
                         "config.init.vision_path, text_path, cross_path")


def resolve_vocab(config: ml_collections.ConfigDict, vocab_size: int, mask_id: int) -> None:
    """Fill `model.text.vocab_size`/`mask_token_id` = -1 from the tokenizer, or check they agree with it."""
    text = config.model.text
    if text.vocab_size == -1:
        text.vocab_size, text.mask_token_id = vocab_size, mask_id
    elif (text.vocab_size, text.mask_token_id) != (vocab_size, mask_id):
        raise ValueError(f"config.model.text vocab_size/mask_token_id ({text.vocab_size}, {text.mask_token_id}) "
                         f"do not match the tokenizer of config.data.tokenizer ({vocab_size}, {mask_id}); set "
                         "both to -1 to take them from the tokenizer")


def _check_batch_split(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
    import jax

    from cclm_jax.parallel import mesh_shape

    n = num_devices if num_devices is not None else jax.device_count()
    data, fsdp, _ = mesh_shape(config.mesh, n)
    shards = data * fsdp
    input_shards = resolve_host_shards(config.data, jax.process_count())
    for kind in ("image_caption", "parallel_text", "region"):
        if config.data.mix.get(kind, 0) <= 0:
            continue
        global_batch = config.data[kind].batch_size * input_shards
        if global_batch % shards:
            raise ValueError(f"config.data.{kind}.batch_size: the global batch {global_batch} is not divisible "
                             f"by the {shards} batch shards (mesh data x fsdp = {data} x {fsdp})")
        if kind == "region" and (config.data.region.max_images * input_shards) % shards:
            raise ValueError(f"config.data.region.max_images: the global {config.data.region.max_images * input_shards}"
                             f" images are not divisible by the {shards} batch shards (mesh data x fsdp = {data} x "
                             f"{fsdp})")
        if config.objectives.negatives == "local" and global_batch // shards < 2:
            raise ValueError(f"config.data.{kind}.batch_size: hard negatives are drawn within each of the "
                             f"{shards} batch shards, which needs >= 2 examples per shard "
                             f"(global batch {global_batch})")


def _check_init(init: ml_collections.ConfigDict) -> None:
    heads = init.text_num_heads
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 0:
        raise ValueError(f"config.init.text_num_heads must be an integer >= 0 (0 = the checkpoint's own), "
                         f"got {heads!r}")
    if init.checkpoint and not os.path.exists(os.path.expanduser(init.checkpoint)):
        raise FileNotFoundError(f"config.init.checkpoint: {init.checkpoint!r} does not exist")
    if bool(init.xlmr_dir) != bool(init.swin_path):
        raise ValueError("config.init.xlmr_dir and config.init.swin_path must be given together")
    if init.xlmr_dir and not os.path.isdir(os.path.expanduser(init.xlmr_dir)):
        raise FileNotFoundError(f"config.init.xlmr_dir: directory {init.xlmr_dir!r} does not exist")
    if init.swin_path and not os.path.isfile(os.path.expanduser(init.swin_path)):
        raise FileNotFoundError(f"config.init.swin_path: file {init.swin_path!r} does not exist")
    for key in ("vision_path", "text_path", "cross_path"):
        if init.get(key) and not os.path.exists(os.path.expanduser(init[key])):
            raise FileNotFoundError(f"config.init.{key}: {init[key]!r} does not exist")
