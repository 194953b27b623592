"""Image-tower outputs computed once per training image when the tower is locked and nothing augments the pixels.

With `model.vision.frozen` (LiT: the image tower gets no gradient and no weight decay, so AdamW leaves it exactly
as loaded) and `data.augment = False` (every epoch sees the same resized pixels), the tower's output for a training
image never changes during a run. Retrieval fine-tuning then encodes each distinct training image once, before the
first step, and the batches carry `image_embeds` (B, T, D) instead of pixels (`data.finetune_input.TrainBatches`),
so a step runs only the text, fusion and head layers: on the 2-core CPU `configs/small_real.py` goes from 5.1 s to
2.4 s per step of 32 (benchmarks/RESULTS.md). The losses are the same function of the same numbers up to float32
rounding of the tower's batched forward (test_finetune_program).

The cache is host memory: images x T x D in the compute dtype (Flickr8k's 3,000 training pictures through
DINOv2-S/14 at 224 px, float32: 3,000 x 257 x 384 x 4 B = 1.2 GB, encoded in 265 s on the 2-core CPU). Every
process encodes every distinct training image (the rows a host reads change with the epoch).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from cclm_jax.data.finetune_input import eval_image_batches
from cclm_jax.data.normalize import normalize
from cclm_jax.models import build_model

progress = logging.getLogger("cclm_jax.progress")  # the run's console lines (`train.console.PROGRESS`)


@dataclasses.dataclass(frozen=True)
class ImageFeatures:
    """The locked tower's outputs: ``embeds`` (N, T, D) in the model's compute dtype for the images ``index``
    maps to rows ({(path or base64 text, is_base64): row})."""

    index: dict
    embeds: np.ndarray

    def lookup(self, sources: Sequence[tuple[str, bool]]) -> np.ndarray:
        """(len(sources), T, D) rows of ``embeds`` for image sources (KeyError for an image never encoded)."""
        return self.embeds[np.array([self.index[s] for s in sources], np.int64)]


def uses_cached_features(config: ml_collections.ConfigDict) -> bool:
    """Whether a fine-tuning run of `config` trains on cached tower outputs (retrieval, locked tower, no
    augmentation, `data.cache_locked_features` not switched off)."""
    return (config.task == "retrieval" and bool(config.model.vision.get("frozen", False))
            and not config.data.augment and bool(config.data.get("cache_locked_features", True)))


def encode_training_images(model_config: ml_collections.ConfigDict, params: dict,
                           sources: Sequence[tuple[str, bool]], *, image_res: int, batch_size: int) -> ImageFeatures:
    """Encode every distinct image of ``sources`` once with the image tower of the model parameters ``params``,
    the evaluation resize to ``image_res``, ``batch_size``
    images per call (the last call padded, so one compilation)."""
    distinct = list(dict.fromkeys(sources))
    model = build_model(model_config)

    @jax.jit
    def encode(pixels):
        embeds, _ = model.apply({"params": params}, normalize(pixels), method=model.encode_image)
        return embeds

    progress.info("locked image tower: encoding the %d training images once", len(distinct))
    start, parts = time.perf_counter(), []
    for pixels in eval_image_batches(distinct, image_res, batch_size):
        n = len(pixels)
        if n < batch_size:
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], batch_size - n, axis=0)])
        parts.append(np.asarray(encode(pixels))[:n])
    embeds = np.concatenate(parts)
    progress.info("locked image tower: %d training images encoded once in %.0f s (%.2f GB of features; "
             "data.cache_locked_features)", len(distinct), time.perf_counter() - start, embeds.nbytes / 1e9)
    return ImageFeatures({s: i for i, s in enumerate(distinct)}, embeds)
