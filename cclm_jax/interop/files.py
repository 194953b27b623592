"""Tensors of PyTorch (`.th`/`.pth`/`.bin`) and safetensors files, read one at a time without copies.

`open_checkpoint(path) -> Checkpoint`: a read-only mapping key -> numpy array, in file order. Zip-format
torch files (everything `torch.save` wrote since torch 1.6) are memory-mapped (`torch.load(mmap=True)`), and
safetensors files are read tensor by tensor, so a 2 GB checkpoint costs no anonymous memory until a tensor is
used, and only that tensor's pages then. Legacy (pre-zip) torch files are read whole, with a log line.

Torch files are read with `weights_only=True`: a checkpoint from the internet cannot run code. Accepted
contents: `{'model': state_dict, ...}` (official CCLM and Microsoft Swin) or a bare state_dict (HF
`pytorch_model.bin`). bfloat16 tensors come back as `ml_dtypes.bfloat16` numpy arrays (exact bits).
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


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU torch tensor as a numpy array sharing its memory (bfloat16 as `ml_dtypes.bfloat16`)."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class Checkpoint(Mapping):
    """Read-only mapping tensor name -> numpy array (file order); `config` is the file's non-tensor part.

    `config`: the `'config'` entry of a `{'model': ..., 'config': ...}` torch file, the `__metadata__` dict
    of a safetensors file, else None. `shape(key)` answers without reading the tensor.
    """

    def __init__(self, path: str, shapes: Mapping[str, tuple[int, ...]], config: Any, getter):
        self.path = path
        self.config = config
        self._shapes = dict(shapes)
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
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.offset_keys()}
    except Exception as e:  # SafetensorError: bad header, truncated buffer, ...
        raise CheckpointError(f"{path}: cannot be read as a safetensors file ({type(e).__name__}: {e})") from e
    return Checkpoint(path, shapes, handle.metadata(), lambda key: tensor_to_numpy(handle.get_tensor(key)))


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
    return Checkpoint(path, shapes, config, lambda key: tensor_to_numpy(obj[key]))
