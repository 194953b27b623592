"""Region grounding accuracy: does the box head find the region a caption describes?

For every elem of held-out region records (``cclm_jax.data.region`` json-lines; the demo's ``region_val.jsonl``
by default) and every language of its caption, the model predicts a box the way the region bbox loss does
(`objectives.region_losses`): the text fused with the whole image (global token + all patches, every one
attended), ``bbox(cls)`` -> (cx, cy, w, h) in [0, 1]. A prediction is correct when its IoU with the true box is
at least ``IOU_THRESHOLD`` (0.5, the referring-expression convention).

Metrics (percent, except ``mean_iou``): ``<lang>/grounding_acc`` and ``<lang>/mean_iou`` per caption language,
``grounding_acc`` over all rows, and two trivial predictors on the same rows: ``chance_mean_box`` (always the mean
true box of the evaluated rows, a favourable constant) and ``chance_random_shape`` (a box of the picture's elems
drawn uniformly: the exact expected accuracy of pointing at a random region of the picture).

Records are read with the training build's rules (``region.region_examples``: malformed records and boxes are
skipped and counted); images get the evaluation transform (bicubic resize to ``image_res``), boxes are
normalised by the original width and height.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from cclm_jax.data import image as image_lib
from cclm_jax.data import region as region_lib
from cclm_jax.data import sources
from cclm_jax.data.normalize import normalize
from cclm_jax.data.text import pad_batch, pre_caption

IOU_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class GroundingSet:
    """Held-out grounding rows.

    images: uint8 (N, R, R, 3); rows (one per elem and caption language): ``image_index`` int32 (M,),
    ``language`` str (M,), ``text`` str (M,), ``box`` float64 (M, 4) (cx, cy, w, h) / (width, height);
    ``image_boxes``: per image, float64 (E_i, 4) its elems' boxes (same units).
    """

    images: np.ndarray
    image_index: np.ndarray
    language: np.ndarray
    text: np.ndarray
    box: np.ndarray
    image_boxes: list


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of row i of ``a`` with row i of ``b``, each (M, 4) (cx, cy, w, h) -> (M,) float64; 0 when the union is
    empty."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)

    def corners(x):
        return x[:, :2] - 0.5 * x[:, 2:], x[:, :2] + 0.5 * x[:, 2:]

    (a0, a1), (b0, b1) = corners(a), corners(b)
    wh = np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0.0, None)
    inter = wh[:, 0] * wh[:, 1]
    union = np.prod(np.clip(a[:, 2:], 0, None), 1) + np.prod(np.clip(b[:, 2:], 0, None), 1) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def load_grounding_set(paths: list[str], *, image_field: str, image_root: str, image_res: int,
                       languages: tuple[str, ...] = ()) -> GroundingSet:
    """Every (elem, language) of the records in ``paths`` (first caption per language; ``languages`` empty =
    all); raises ValueError when no row is left."""
    counter = sources.SkipCounter()
    images, image_index, language, text, box, image_boxes = [], [], [], [], [], []
    for _, example in region_lib.region_examples(paths, image_field=image_field, image_root=image_root,
                                                 counter=counter):
        width, height = example["width"], example["height"]
        meta = json.loads(example["meta"])
        scale = np.array([width, height, width, height], np.float64)
        boxes = np.array(meta["boxes"], np.float64)
        boxes = np.concatenate([boxes[:, :2] + 0.5 * boxes[:, 2:], boxes[:, 2:]], axis=1) / scale
        index = len(images)
        for elem, elem_box in zip(meta["elems"], boxes):
            seen = set()
            for lang, caption in elem["caption"]:
                if lang in seen or (languages and lang not in languages):
                    continue
                seen.add(lang)
                image_index.append(index)
                language.append(lang)
                text.append(caption)
                box.append(elem_box)
        image_boxes.append(boxes)
        images.append(image_lib.eval_image(tf.constant(example["image"]), image_res).numpy())
    if not text:
        raise ValueError(f"no grounding rows in {paths} (skipped: {dict(counter.counts)})")
    return GroundingSet(np.stack(images), np.array(image_index, np.int32), np.array(language), np.array(text),
                        np.stack(box), image_boxes)


def grounding_metrics(data: GroundingSet, pred: np.ndarray) -> dict[str, float]:
    """The module's metrics for predicted boxes ``pred`` (M, 4) (cx, cy, w, h) normalised, row order of ``data``."""
    iou = box_iou(pred, data.box)
    hit = iou >= IOU_THRESHOLD
    out = {"grounding_acc": 100.0 * float(hit.mean())}
    for lang in sorted(set(data.language.tolist())):
        rows = data.language == lang
        out[f"{lang}/grounding_acc"] = 100.0 * float(hit[rows].mean())
        out[f"{lang}/mean_iou"] = float(iou[rows].mean())
    mean_box = np.broadcast_to(data.box.mean(axis=0), data.box.shape)
    out["chance_mean_box"] = 100.0 * float((box_iou(mean_box, data.box) >= IOU_THRESHOLD).mean())
    random_shape = [np.mean(box_iou(data.image_boxes[i], np.broadcast_to(b, data.image_boxes[i].shape))
                            >= IOU_THRESHOLD) for i, b in zip(data.image_index, data.box)]
    out["chance_random_shape"] = 100.0 * float(np.mean(random_shape))
    return out


def predict_boxes(model, params: Any, data: GroundingSet, tokenizer, *, max_tokens: int, max_words: int,
                  batch_size: int) -> np.ndarray:
    """(M, 4) float32 box-head predictions for the rows of ``data``, ``batch_size`` images and rows per call
    (the last batch padded, so one compilation)."""
    def apply(method, *args):
        return model.apply({"params": params}, *args, method=getattr(model, method))

    @jax.jit
    def encode(images):
        return apply("encode_image", normalize(images))[0]

    @jax.jit
    def boxes(image_embeds, index, ids, atts):
        full = jnp.take(image_embeds, index, axis=0)
        text = apply("encode_text", ids, atts)
        cls = apply("fuse", full, jnp.ones(full.shape[:2], jnp.int32), text, atts)[:, 0]
        return apply("bbox", cls)

    def padded(x, n):
        return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)]) if len(x) < n else x

    embeds = [encode(padded(data.images[i:i + batch_size], batch_size))[: len(data.images[i:i + batch_size])]
              for i in range(0, len(data.images), batch_size)]
    image_embeds = jnp.concatenate(embeds)
    ids, atts = pad_batch(tokenizer.encode_batch([pre_caption(t, max_words) for t in data.text]), max_tokens)
    out = []
    for i in range(0, len(ids), batch_size):
        n = len(ids[i:i + batch_size])
        pred = boxes(image_embeds, padded(data.image_index[i:i + batch_size], batch_size),
                     padded(ids[i:i + batch_size], batch_size), padded(atts[i:i + batch_size], batch_size))
        out.append(np.asarray(pred, np.float32)[:n])
    return np.concatenate(out)


GROUNDING_OPTIONS = ("kind", "every", "paths", "image_field", "image_root", "languages")


def check_grounding_spec(name: str, spec) -> None:
    """Raise ValueError naming ``config.evals.<name>.<key>`` for an option of a `grounding` evaluator it cannot
    honour (unknown key, ``paths`` not a list of existing files)."""
    where = f"config.evals.{name}"
    unknown = sorted(set(spec.keys()) - set(GROUNDING_OPTIONS))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown} (grounding takes {GROUNDING_OPTIONS[1:]})")
    paths = spec.get("paths", ())
    if isinstance(paths, str) or not all(isinstance(p, str) for p in paths):
        raise ValueError(f"{where}.paths must be a list of region json-lines files (empty: the demo's "
                         f"region_val.jsonl), got {paths!r}")
    for i, path in enumerate(paths):
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"{where}.paths[{i}]: file {path!r} does not exist")


def make_grounding(data_config, model_config, name: str, spec, tokenizer, demo_val_path):
    """fn(params, step) -> metrics of a `grounding` evaluator (`config.evals.<name>`; ``check_grounding_spec``).
    Texts and images follow ``data_config.region`` (image_res, max_tokens, max_words), batches
    ``data_config.eval.batch_size``; ``demo_val_path()`` gives the file read when ``paths`` is empty. The
    held-out set is read on the first call."""
    from cclm_jax.models import build_model

    check_grounding_spec(name, spec)
    region = data_config.region
    model = build_model(model_config)
    cache: dict[str, GroundingSet] = {}

    def evaluate(params, step):
        if "data" not in cache:
            paths = list(spec.get("paths", ())) or [demo_val_path()]
            cache["data"] = load_grounding_set(paths, image_field=spec.get("image_field", "binary"),
                                               image_root=spec.get("image_root", ""), image_res=region.image_res,
                                               languages=tuple(spec.get("languages", ())))
        data = cache["data"]
        pred = predict_boxes(model, params, data, tokenizer, max_tokens=region.max_tokens,
                             max_words=region.max_words, batch_size=data_config.eval.batch_size)
        return grounding_metrics(data, pred)

    return evaluate
