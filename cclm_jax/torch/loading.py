"""Load CCLM or CCLM-X2VLM weights into ``cclm_jax.torch.CCLM`` / ``cclm_jax.torch.X2VLM`` from official ``.th``
files, bare state_dicts or ``model.safetensors`` + ``config.json``, with key-by-key checks. The family comes from
the config (a ``cross`` section: CCLM-X2VLM) or, without one, from the state_dict's keys
(``config.state_dict_family``).

Torch files are read with ``torch.load(..., weights_only=True)``: a file from the internet can run code
when unpickled. ``allow_pickle=True`` switches to full unpickling (with a warning) for trusted files only.
"""
import json
import pathlib
import pickle
import warnings
from collections.abc import Mapping

import torch

from cclm_jax.torch.config import ConfigError, config_from_state_dict, is_x2vlm_config
from cclm_jax.torch.model import CCLM, ContrastiveMatchingHeads
from cclm_jax.torch.x2vlm import X2VLM

TIED_KEYS = CCLM.TIED_KEYS  # the CCLM pairs (kept for callers); each model class lists its own
SAFETENSORS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
_LISTED = 5  # offending keys named per kind of mismatch


class StateDictMismatchError(ValueError):
    """A state_dict does not fit the CCLM / CCLM-X2VLM module: missing / unexpected keys, wrong shapes or buffers."""


def _listing(kind: str, keys: list) -> str:
    more = f" (+{len(keys) - _LISTED} more)" if len(keys) > _LISTED else ""
    return f"{len(keys)} {kind}: {keys[:_LISTED]}{more}"


def complete_state_dict(model: ContrastiveMatchingHeads, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Check ``state_dict`` against ``model`` and return it completed for ``load_state_dict(strict=True)``.

    Absent buffers (relative_position_index, attn_mask, position_ids) are taken from the model, which built
    them from its config; an absent tied copy (``model.TIED_KEYS``: decoder weight/bias) is taken from its twin. Raises
    StateDictMismatchError naming the first offending keys for missing or unexpected keys, shape
    mismatches, tied copies that differ, and buffers that differ from the ones the config implies."""
    expected = model.state_dict()
    result = dict(state_dict)
    tied = model.TIED_KEYS
    for key, twin in tied:
        if key in result and twin not in result:
            result[twin] = result[key]
        elif twin in result and key not in result:
            result[key] = result[twin]
    buffers = dict(model.named_buffers())
    for name, buffer in buffers.items():
        result.setdefault(name, buffer)

    missing = [k for k in expected if k not in result]
    unexpected = [k for k in result if k not in expected]
    shapes = [f"{k} {tuple(result[k].shape)} != expected {tuple(v.shape)}"
              for k, v in expected.items() if k in result and tuple(result[k].shape) != tuple(v.shape)]
    problems = [_listing(kind, keys) for kind, keys in
                (("missing key(s)", missing), ("unexpected key(s)", unexpected), ("shape mismatch(es)", shapes))
                if keys]
    if problems:
        raise StateDictMismatchError(f"state_dict does not fit the {model.FAMILY} config: " + "; ".join(problems))

    untied = [twin for key, twin in tied if not torch.equal(result[key], result[twin])]
    if untied:
        raise StateDictMismatchError(f"tied tensors differ: {untied} must equal "
                                     f"{[key for key, twin in tied if twin in untied]}")
    stale = [name for name, buffer in buffers.items() if not torch.equal(result[name].to(buffer.dtype), buffer)]
    if stale:
        geometry = "vision.image_res / vision.patch_size" if isinstance(model, X2VLM) else \
            "vision.image_res / vision.window_size"
        raise StateDictMismatchError(_listing(f"buffer(s) differ from those the config implies (check {geometry})",
                                              stale))
    return result


def build(config: Mapping) -> CCLM | X2VLM:
    """The module of an architecture config: X2VLM when it has a ``cross`` section, else CCLM (train mode,
    as any new torch module)."""
    return X2VLM(config) if is_x2vlm_config(config) else CCLM(config)


def from_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping | None = None,
                    text_num_heads: int | None = None, image_res: int | None = None) -> CCLM | X2VLM:
    """Build a CCLM or CCLM-X2VLM in eval mode from a state_dict; ``config`` defaults to
    ``config_from_state_dict(state_dict, text_num_heads, image_res)`` (text heads: 16 for a CCLM; by width for
    a CCLM-X2VLM, see ``config.x2vlm_config_from_state_dict``). A state_dict of neither family raises
    ConfigError."""
    if config is None:
        config = config_from_state_dict(state_dict, text_num_heads, image_res)
    model = build(config)
    model.load_state_dict(complete_state_dict(model, state_dict), strict=True)
    return model.eval()


def _read_torch_file(path: pathlib.Path, allow_pickle: bool) -> object:
    if allow_pickle:
        warnings.warn(f"{path}: unpickling with weights_only=False can run arbitrary code; only do this for "
                      f"files you trust", stacklevel=3)
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = next((line.strip() for line in str(error).splitlines() if "WeightsUnpickler error" in line),
                      str(error))
        raise ValueError(f"{path}: torch.load(weights_only=True) refused the file, which holds objects other than "
                         f"tensors and plain containers ({reason}). If you trust the file, pass "
                         f"allow_pickle=True.") from error


def _is_architecture(config: object) -> bool:
    return isinstance(config, Mapping) and "vision" in config and "text" in config


def _recorded_architecture(config: object) -> Mapping | None:
    """The architecture a torch file's ``'config'`` records: itself when it has this package's layout, or its
    ``'architecture'`` entry (what ``cclm_jax.interop.official.save`` and ``cclm-jax export`` write)."""
    if _is_architecture(config):
        return config
    if isinstance(config, Mapping) and _is_architecture(config.get("architecture")):
        return config["architecture"]
    return None


def load(path: str | pathlib.Path, config: Mapping | None = None, text_num_heads: int | None = None,
         image_res: int | None = None, allow_pickle: bool = False) -> CCLM | X2VLM:
    """Load a CCLM or CCLM-X2VLM (eval mode, float32, CPU) from one of:

    - a torch file (``.th``/``.pth``/``.bin``): ``{'model': state_dict, 'config': ...}`` or a bare state_dict;
    - a ``.safetensors`` file, or a directory holding ``model.safetensors``, with ``config.json`` beside it.

    The architecture is ``config`` if given, else ``config.json`` (safetensors), else the checkpoint's
    ``'config'`` when it has this package's layout (``vision``/``text``/``embed_dim``, also under
    ``'architecture'`` as our ``.th`` exports write it), else inferred from tensor shapes (text heads: see
    ``from_state_dict``; the official training config holds no architecture numbers). Official X2-VLM
    ``CrossViewLM`` files (``cross_encoder.*`` keys) give an X2VLM. Raises StateDictMismatchError / ConfigError /
    ValueError naming the file and key."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / SAFETENSORS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(path, device="cpu")
        if config is None:
            config_path = path.with_name(CONFIG_NAME)
            if not config_path.exists():
                raise FileNotFoundError(f"{config_path}: the architecture config.json must sit beside {path.name}")
            config = json.loads(config_path.read_text())
    else:
        checkpoint = _read_torch_file(path, allow_pickle)
        if isinstance(checkpoint, Mapping) and "model" in checkpoint:
            state_dict = checkpoint["model"]
            if config is None:
                config = _recorded_architecture(checkpoint.get("config"))
                recorded = None if config is None else config["text"].get("num_heads")
                if text_num_heads and recorded is not None and int(text_num_heads) != int(recorded):
                    raise ConfigError(f"{path} records {recorded} text attention heads, but text_num_heads="
                                      f"{text_num_heads} was given: leave it unset to use the file's value")
        else:
            state_dict = checkpoint
        if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise ValueError(f"{path}: expected {{'model': state_dict, 'config': ...}} or a state_dict of tensors, "
                             f"got {type(state_dict).__name__}")
    try:
        return from_state_dict(state_dict, config, text_num_heads, image_res)
    except (ConfigError, StateDictMismatchError) as error:
        raise type(error)(f"{path}: {error}") from error
