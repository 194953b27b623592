"""A CCLM initialised from an HF `Dinov2Model` image tower and an HF `BertModel` text tower (`configs/small_real.py`).

`init_from_hf_towers(model_config, vision_dir, text_dir, rng) -> (params, from_pretrained)`:

- vision (`model.vision.kind='vit'`, DINOv2 fields): HF names -> the timm names of `layout.vit_entries`
  (`dinov2_timm_state_dict`: `embeddings.cls_token` -> `cls_token`, `embeddings.position_embeddings` ->
  `pos_embed`, `embeddings.patch_embeddings.projection` -> `patch_embed.proj`, per layer `norm1`/`norm2`,
  query/key/value concatenated in that order into `attn.qkv`, `attention.output.dense` -> `attn.proj`,
  `layer_scale{1,2}.lambda1` -> `gamma_{1,2}`, `mlp.fc{1,2}`; the final `layernorm` -> `norm`);
- text: HF BERT layer i -> our layer i (`text_encoder.bert.` + the HF key): layers 0..F-1 are the text encoder,
  F..N-1 the fusion layers, whose cross-attention is new (CCLM takes XLM-R's layers the same way);
- the text tower's vocabulary rows past `model.text.vocab_size` are dropped (e5 has 250,037 rows; XLM-R's
  tokenizer produces ids < 250,002): a tower with fewer rows than the model is an error;
- the image tower's patch projection is re-expressed for the pipeline's input normalisation (`input_mean`,
  `input_std`: the project normalises with CLIP's mean/std, DINOv2 was trained with ImageNet's, recorded as
  `image_mean`/`image_std` in its config.json): with u = pixel / 255, the tower wants t = (u - m_t) / s_t and gets
  p = (u - m_p) / s_p, so t = p * s_p / s_t + (m_p - m_t) / s_t and, the convolution being linear without
  padding, W' = W * s_p / s_t per input channel and b' = b + sum over (c, y, x) of W * (m_p - m_t) / s_t exactly;
- new parameters (cross-attention, projections, ITM/bbox heads, the MLM head's transform and bias, `temp`) keep
  the values `model.init(rng)` gives them, except the cross-attention's output projection
  (`crossattention/output/dense`), which starts at zero: the fusion layers then start as the text tower's upper
  layers over the sentence alone and the image enters as that projection learns. With the random projection the
  image term swamped the sentence (DINOv2's final-norm features reach ~11): after 230 steps of
  `configs/small_real.py` every fusion position carried the same image-determined state (ITM logits of a caption
  with a shifted image equal those of that image's own caption) and ITM stayed at chance (0.637).

Each directory holds `model.safetensors` + `config.json` (as `convert_real.save_hf` writes them); the config's
sizes must match `model_config` (CheckpointError naming the field otherwise). `from_pretrained` mirrors `params`
with Python bools (True: the value came from a tower).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from cclm_jax.interop.files import CheckpointError, open_checkpoint
from cclm_jax.interop.layout import from_torch_array, get_path, official_layout, set_path
from cclm_jax.interop.shapes import param_shapes
from cclm_jax.models import build_model

# HF config field -> (model section, field) that must agree.
DINOV2_FIELDS = {"hidden_size": "embed_dim", "num_hidden_layers": "depth", "num_attention_heads": "num_heads",
                 "patch_size": "patch_size", "layer_norm_eps": "layer_norm_eps"}
BERT_FIELDS = {"hidden_size": "hidden_size", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
               "intermediate_size": "intermediate_size",
               "max_position_embeddings": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
               "layer_norm_eps": "layer_norm_eps"}
_DINOV2_LAYER = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
                 "layer_scale1.lambda1": "gamma_1", "layer_scale2.lambda1": "gamma_2", "mlp.fc1": "mlp.fc1",
                 "mlp.fc2": "mlp.fc2"}


def read_hf_dir(directory: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, tensors as float32 numpy) of an HF checkpoint directory with `model.safetensors`."""
    directory = pathlib.Path(os.path.expanduser(os.fspath(directory)))
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: no {name} (an HF checkpoint directory)")
    config = json.loads((directory / "config.json").read_text())
    checkpoint = open_checkpoint(str(directory / "model.safetensors"))
    return config, {k: np.asarray(checkpoint[k], np.float32) for k in checkpoint}


def dinov2_timm_state_dict(hf: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF `Dinov2Model` tensors -> the timm/BEiT names `layout.vit_entries` reads (module docstring).

    Keys other than the model's (`embeddings.mask_token`, a pooler) are dropped; a missing one raises KeyError."""
    out = {"cls_token": hf["embeddings.cls_token"], "pos_embed": hf["embeddings.position_embeddings"],
           "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": hf["layernorm.weight"], "norm.bias": hf["layernorm.bias"]}
    layers = sorted({int(m.group(1)) for k in hf if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layer.{i}", f"blocks.{i}"
        for kind in ("weight", "bias"):
            out[f"{dst}.attn.qkv.{kind}"] = np.concatenate(
                [hf[f"{src}.attention.attention.{m}.{kind}"] for m in ("query", "key", "value")])
        for theirs, ours in _DINOV2_LAYER.items():
            if theirs.endswith("lambda1"):
                out[f"{dst}.{ours}"] = hf[f"{src}.{theirs}"]
                continue
            for kind in ("weight", "bias"):
                out[f"{dst}.{ours}.{kind}"] = hf[f"{src}.{theirs}.{kind}"]
    return out


def _check_config(config: dict, section: ml_collections.ConfigDict, fields: Mapping[str, str], where: str,
                  prefix: str) -> None:
    problems = []
    for theirs, ours in fields.items():
        want, got = section[ours], config.get(theirs)
        same = np.isclose(got, want, rtol=1e-6) if isinstance(want, float) and got is not None else got == want
        if not same:
            problems.append(f"{theirs}={got!r} but {prefix}.{ours}={want!r}")
    if config.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act={config['hidden_act']!r} but the model uses exact 'gelu'")
    if problems:
        raise CheckpointError(f"{where}: does not match the model config: " + "; ".join(problems))


def fold_input_normalization(weight: np.ndarray, bias: np.ndarray, tower: tuple, pipeline: tuple,
                             ) -> tuple[np.ndarray, np.ndarray]:
    """A patch projection (out, 3, p, p) + (out,) for inputs normalised with `pipeline` = (mean, std) instead of
    `tower` = (mean, std) (per RGB channel, on [0, 1] pixels); module docstring."""
    (m_t, s_t), (m_p, s_p) = (np.asarray(x, np.float64) for x in tower), (np.asarray(x, np.float64) for x in pipeline)
    w = weight.astype(np.float64)
    new_bias = bias + np.einsum("ocyx,c->o", w, (m_p - m_t) / s_t)
    return (w * (s_p / s_t)[None, :, None, None]).astype(np.float32), new_bias.astype(np.float32)


def tower_state_dict(model_config: ml_collections.ConfigDict, vision_dir: str | os.PathLike | None,
                     text_dir: str | os.PathLike | None, input_mean: tuple | None = None,
                     input_std: tuple | None = None) -> dict[str, np.ndarray]:
    """The official-layout tensors (`vision_encoder.*`, `text_encoder.bert.*`) the two towers provide; either
    directory may be None (that tower stays as initialised). `input_mean`/`input_std`: the pipeline's image
    normalisation (None: the tower's own)."""
    state: dict[str, np.ndarray] = {}
    if vision_dir is not None:
        config, tensors = read_hf_dir(vision_dir)
        _check_config(config, model_config.vision, DINOV2_FIELDS, os.path.join(vision_dir, "config.json"),
                      "model.vision")
        timm = dinov2_timm_state_dict(tensors)
        if input_mean is not None and "image_mean" in config:
            timm["patch_embed.proj.weight"], timm["patch_embed.proj.bias"] = fold_input_normalization(
                timm["patch_embed.proj.weight"], timm["patch_embed.proj.bias"],
                (config["image_mean"], config["image_std"]), (input_mean, input_std))
        state.update({f"vision_encoder.{k}": v for k, v in timm.items()})
    if text_dir is not None:
        config, tensors = read_hf_dir(text_dir)
        where = os.path.join(text_dir, "config.json")
        _check_config(config, model_config.text, BERT_FIELDS, where, "model.text")
        vocab = model_config.text.vocab_size
        if config.get("vocab_size", 0) < vocab:
            raise CheckpointError(f"{where}: vocab_size={config.get('vocab_size')!r} is smaller than "
                                  f"model.text.vocab_size={vocab}")
        words = "embeddings.word_embeddings.weight"
        tensors[words] = tensors[words][:vocab]
        state.update({f"text_encoder.bert.{k}": v for k, v in tensors.items() if not k.startswith("pooler.")})
    return state


def init_from_hf_towers(model_config: ml_collections.ConfigDict, vision_dir: str | os.PathLike | None,
                        text_dir: str | os.PathLike | None, rng: jax.Array, input_mean: tuple | None = None,
                        input_std: tuple | None = None) -> tuple[dict, dict]:
    """(params, from_pretrained) of a CCLM (module docstring): tower tensors where the towers have them,
    `model.init(rng)` values elsewhere. Raises CheckpointError on a shape mismatch or an unused tower tensor."""
    state = tower_state_dict(model_config, vision_dir, text_dir, input_mean, input_std)
    shapes = param_shapes(model_config)
    params: dict = {}
    from_pretrained = jax.tree.map(lambda _: False, shapes, is_leaf=lambda x: isinstance(x, tuple))
    used, errors = set(), []
    for entry in official_layout(model_config):
        if entry.kind == "buffer" or entry.tied_to is not None or entry.key not in state:
            continue
        used.add(entry.key)
        try:
            value = from_torch_array(entry, state[entry.key], get_path(shapes, entry.path))
        except ValueError as e:
            errors.append(str(e))
            continue
        set_path(params, entry.path, jnp.asarray(value, jnp.float32))
        set_path(from_pretrained, entry.path, True)
    unused = sorted(set(state) - used)
    if errors or unused:
        raise CheckpointError(f"the towers do not fit the model: {errors[:3]}; unused tensors {unused[:5]}")
    new_paths = [path for path, flag in _leaves(from_pretrained) if not flag]
    for path, value in zip(new_paths, _init_leaves(model_config, rng, new_paths)):
        gate = path[-4:-1] == ("crossattention", "output", "dense")
        set_path(params, path, jnp.zeros_like(value) if gate else value)
    return params, from_pretrained


def _leaves(tree: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    out = []
    for name, value in tree.items():
        out += _leaves(value, prefix + (name,)) if isinstance(value, dict) else [(prefix + (name,), value)]
    return out


def _init_leaves(model_config: ml_collections.ConfigDict, rng: jax.Array,
                 paths: list[tuple[str, ...]]) -> list[jax.Array]:
    """The leaves at `paths` of the full `model.init(rng)` (jit computes only those)."""
    model = build_model(model_config)
    res = model_config.vision.image_res
    ids = jnp.zeros((1, 4), jnp.int32)

    def init(key):
        params = nn.meta.unbox(model.init(key, jnp.zeros((1, res, res, 3)), ids, ids)["params"])
        return [get_path(params, path) for path in paths]

    return jax.jit(init)(rng)
