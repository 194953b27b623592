"""Tensors of PyTorch (`.th`/`.pth`/`.bin`) and safetensors files, read one at a time without copies.

`open_checkpoint(path) -> Checkpoint`: a read-only mapping key -> numpy array, in file order. Zip-format
torch files (everything `torch.save` wrote since torch 1.6) are memory-mapped (`torch.load(mmap=True)`), and
safetensors files are read tensor by tensor, so a 2 GB checkpoint costs no anonymous memory until a tensor is
used, and only that tensor's pages then. Legacy (pre-zip) torch files are read whole, with a log line.

Torch files are read with `weights_only=True`: a checkpoint from the internet cannot run code. Accepted
contents: `{'model': state_dict, ...}` (official CCLM and Microsoft Swin) or a bare state_dict (HF
`pytorch_model.bin`). bfloat16 tensors come back as `ml_dtypes.bfloat16` numpy arrays (exact bits).

`check_dtypes(state_dict, expected, where)`: parameters must be stored as floats (any width: the readers cast
them to float32) and index buffers as integers; the first key in file order that is not raises
`CheckpointError` (a file of int32 "weights" would otherwise import as truncated, mostly-zero values).
"""
from __future__ import annotations

import logging
import os
import zipfile
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the expected layout; names the file or keys."""


# safetensors dtype codes -> numpy / torch dtype names.
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                       "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
                       "U8": "uint8", "BOOL": "bool"}


def dtype_kind(name: str) -> str | None:
    """'floating' (float*, bfloat16), 'integer' (int*, uint*) or None (bool, complex, ...) for a dtype name."""
    if name.startswith(("float", "bfloat")):
        return "floating"
    if name.startswith(("int", "uint")):
        return "integer"
    return None


def dtype_name(state_dict: Mapping, key: str) -> str:
    """The dtype name ('float32', 'bfloat16', 'int64', ...) of a tensor, without reading it from a `Checkpoint`."""
    getter = getattr(state_dict, "dtype", None)
    return getter(key) if callable(getter) else np.asarray(state_dict[key]).dtype.name


def check_dtypes(state_dict: Mapping, expected: Mapping[str, str], where: str = "") -> None:
    """Raise CheckpointError (prefixed `where: ` when given) naming the first key of `state_dict` (file order)
    whose dtype is not of the kind `expected[key]` ('floating' or 'integer'); keys absent from `expected` are
    not checked."""
    for key in state_dict:
        want = expected.get(key)
        if want is None:
            continue
        found = dtype_name(state_dict, key)
        if dtype_kind(found) != want:
            what = ("a floating dtype (a parameter: any float width is cast to float32)" if want == "floating"
                    else "an integer dtype (an index buffer)")
            raise CheckpointError(f"{where + ': ' if where else ''}{key} has dtype {found}, expected {what}")


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU torch tensor as a numpy array sharing its memory (bfloat16 as `ml_dtypes.bfloat16`)."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class Checkpoint(Mapping):
    """Read-only mapping tensor name -> numpy array (file order); `config` is the file's non-tensor part.

    `config`: the `'config'` entry of a `{'model': ..., 'config': ...}` torch file, the `__metadata__` dict
    of a safetensors file, else None. `shape(key)` and `dtype(key)` answer without reading the tensor.
    """

    def __init__(self, path: str, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str], config: Any,
                 getter):
        self.path = path
        self.config = config
        self._shapes = dict(shapes)
        self._dtypes = dict(dtypes)
        self._get = getter

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._shapes:
            raise KeyError(key)
        return self._get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, key: object) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._shapes[key])

    def dtype(self, key: str) -> str:
        """The tensor's dtype name as numpy and torch spell it ('float32', 'bfloat16', 'int64', ...)."""
        return self._dtypes[key]


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a torch or safetensors checkpoint (chosen by the `.safetensors` suffix) for lazy reading.

    Raises FileNotFoundError for a missing file and CheckpointError (naming the file) for a corrupt,
    truncated or non-state_dict file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        return _open_safetensors(path)
    return _open_torch(path)


def _open_safetensors(path: str) -> Checkpoint:
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt", device="cpu")
        slices = {key: handle.get_slice(key) for key in handle.offset_keys()}
        shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
        dtypes = {key: _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype().lower()) for key, s in slices.items()}
    except Exception as e:  # SafetensorError: bad header, truncated buffer, ...
        raise CheckpointError(f"{path}: cannot be read as a safetensors file ({type(e).__name__}: {e})") from e
    return Checkpoint(path, shapes, dtypes, handle.metadata(), lambda key: tensor_to_numpy(handle.get_tensor(key)))


def _open_torch(path: str) -> Checkpoint:
    mmap = zipfile.is_zipfile(path)
    if not mmap:
        logging.info("%s is not a zip-format torch file; reading it whole (no memory map)", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, corrupt, or holds pickled code
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    config = None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        config = obj.get("config")
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict (or {{'model': state_dict}}) of tensors, "
                              f"got {type(obj).__name__}")
    shapes = {key: tuple(value.shape) for key, value in obj.items()}
    dtypes = {key: str(value.dtype).removeprefix("torch.") for key, value in obj.items()}
    return Checkpoint(path, shapes, dtypes, config, lambda key: tensor_to_numpy(obj[key]))
