"""Region grounding data (X-VLM objects and regions; the CCLM-4M setting): records, sampling, rows.

Record (json-lines, one object per line; spec §3.2):
``{"binary": <base64 | path under image_root>, "caption": optional whole-image caption,
"elems": [{"bb": [x, y, w, h], "caption": ..., "attributes": optional}, ...]}``. Boxes are in pixels of the
original image (x right, y down) and truncated to integers as the reference does. A caption or attribute is a
text (English, as X-VLM's files), a list of texts, a ``{lang: text | [texts]}`` dict, or a list of those.

Build (``RegionJsonl``, a TFDS builder like the other sources; counts in ``Source.skipped``): a record without
the image field or a non-empty ``elems`` list counts as ``missing_field``, an undecodable image as
``corrupt_image`` (``missing_image_file`` for a path); an elem whose box is malformed, of zero area or not inside
the image is dropped as ``invalid_box``, one without a usable caption as ``empty_caption``; a record left with
no elem counts as ``no_region``. Stored per record: the image bytes, its ``width``/``height``, ``boxes`` (4E,)
int, ``left_right`` (1 when any caption or attribute mentions left or right) and ``meta`` (JSON: the whole-image
caption and each elem's captions and attributes as [lang, text] pairs, and the boxes again).

Sampling one image (``RegionJsonl`` records, in the pipeline; the reference ``RegionMultiTextDataset``):
1. ``crop_around_box`` (TensorFlow, per example): one elem uniformly; a crop [x0, x1) x [y0, y1) with x0 uniform
   in 0..x, x1 uniform in min(x + w, W)..W (same for y), so that box lies inside; horizontal flip with p 0.5
   unless ``careful_hflip`` and ``left_right``; bicubic resize to ``image_res``; then RandomAugment(2, 7) over
   ``randaugment.REGION_AUGMENTS`` (photometric only: boxes stay valid).
2. ``image_rows`` (numpy, per batch): the whole-image caption row first when the record has one
   (``is_image`` 1, target (0.5, 0.5, 1, 1), every patch on), then elems in random order while the image has
   fewer than ``max_regions`` rows: ``transform_box`` keeps an elem when more than ``min_perc_in_image`` of its
   area is inside the crop and maps the clipped box through crop, flip and resize; the row's text is one caption
   (a language uniformly among the allowed ones, then a caption), prefixed by an attribute ("attr caption", in
   the caption's language when it has one, else any).
3. ``batch_rows``: ``max_images`` images per batch (every image has at least one row: its chosen elem lies
   inside the crop), then ``batch_size`` rows drawn from all of them without replacement in random order; with
   fewer rows the rest repeats rows marked ``valid`` False (the reference repeats rows as real ones, which it
   notes breaks the contrastive loss). ``patch_mask`` is the reference ``get_image_attns``: on the
   (image_res / patch_size)^2 output grid the cells [floor(x/p), ceil((x+w)/p)) x [floor(y/p), ceil((y+h)/p))
   (at least one per axis), plus index 0 always on.

Batch (``region`` kind; R = batch_size rows, N = max_images): ``image`` uint8 (N, res, res, 3);
``idx_to_group_img`` int32 (R,) (the row's image); ``image_atts`` int32 (R, 1 + n^2); ``target_bbox`` float32
(R, 4) (cx, cy, w, h) / image_res; ``is_image`` int32 (R,); ``valid`` bool (R,); the five text keys.
Deliberate differences: the attribute prefix is a whole attribute (the reference's code-switch branch takes the
first character of one, ``get_caption(...)[0]``); captions mentioning left/right are found in every language's
text (the reference tests dict keys for dict captions).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cclm_jax.data import image as image_lib
from cclm_jax.data import randaugment, sources

RECORD_SKIPS = ("invalid_utf8", "invalid_json", "missing_field", "missing_image_file", "corrupt_image", "no_region")
ELEM_DROPS = ("invalid_box", "empty_caption")
PLAIN_TEXT_LANGUAGE = "en"
WHOLE_IMAGE_BOX = (0.5, 0.5, 1.0, 1.0)
CROP_UNIFORMS = 6  # elem, x0, y0, x1, y1, flip


# ----------------------------------------------------------------------------- records (build time)

def text_pairs(value) -> list[tuple[str, str]] | None:
    """[(language, text)] of a caption/attribute value (see the module docstring); None if malformed."""
    if isinstance(value, str):
        return [(PLAIN_TEXT_LANGUAGE, value)]
    if isinstance(value, dict):
        pairs = []
        for lang, texts in value.items():
            for text in texts if isinstance(texts, list) else [texts]:
                if not isinstance(text, str):
                    return None
                pairs.append((str(lang), text))
        return pairs
    if isinstance(value, list):
        pairs = []
        for item in value:
            inner = text_pairs(item)
            if inner is None or isinstance(item, list):
                return None
            pairs += inner
        return pairs
    return None


def _usable(pairs) -> list[list[str]]:
    return [[lang, text] for lang, text in pairs or [] if sources._is_usable_text(text)]


def valid_box(bb, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The integer box (x, y, w, h) of ``bb`` when it has positive area and lies inside the image, else None."""
    if not isinstance(bb, (list, tuple)) or len(bb) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bb):
        return None
    x, y, w, h = (int(v) for v in bb)
    if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > width or y + h > height:
        return None
    return x, y, w, h


def _mentions_left_right(pairs) -> bool:
    return any("left" in text or "right" in text for _, text in pairs)


def region_examples(paths, *, image_field: str, image_root: str,
                    counter: sources.SkipCounter) -> Iterator[tuple[str, dict]]:
    """(key, stored example) for every usable record of ``paths`` (see the module docstring)."""
    for path in paths:
        for where, record in sources._json_records(path, counter):
            elems = record.get("elems")
            if image_field not in record or not isinstance(elems, list) or not elems:
                counter.skip("missing_field", where, f"needs {image_field!r} and a non-empty 'elems' list; has "
                             f"{sorted(record)}")
                continue
            data = sources._load_image_bytes(record[image_field], image_root, where, counter)
            if data is None:
                continue
            if not image_lib.is_decodable(data):
                counter.skip("corrupt_image", where, "undecodable image bytes")
                continue
            height, width = (int(v) for v in image_lib.decode_image(tf.constant(data)).shape[:2])
            whole = _usable(text_pairs(record["caption"])) if "caption" in record else []
            boxes, kept = [], []
            for n, elem in enumerate(elems):
                box = valid_box(elem.get("bb") if isinstance(elem, dict) else None, width, height)
                if box is None:
                    counter.skip("invalid_box", f"{where} elem {n}",
                                 f"box {elem.get('bb') if isinstance(elem, dict) else elem!r} in a "
                                 f"{width}x{height} image")
                    continue
                captions = _usable(text_pairs(elem.get("caption")))
                if not captions:
                    counter.skip("empty_caption", f"{where} elem {n}")
                    continue
                boxes += box
                kept.append({"caption": captions, "attributes": _usable(text_pairs(elem.get("attributes", [])))})
            if not kept:
                counter.skip("no_region", where)
                continue
            every_text = whole + [p for e in kept for p in e["caption"] + e["attributes"]]
            meta = {"caption": whole, "elems": kept, "boxes": [boxes[i:i + 4] for i in range(0, len(boxes), 4)]}
            yield where, {"image": data, "width": width, "height": height, "boxes": np.array(boxes, np.int64),
                          "left_right": int(_mentions_left_right(every_text)),
                          "meta": json.dumps(meta, ensure_ascii=False)}


class RegionJsonl(sources._RecipeBuilder):
    """Region json-lines (see the module docstring)."""

    PARSE_SPEC = {"image": tf.io.FixedLenFeature([], tf.string), "width": tf.io.FixedLenFeature([], tf.int64),
                  "height": tf.io.FixedLenFeature([], tf.int64), "boxes": tf.io.RaggedFeature(tf.int64),
                  "left_right": tf.io.FixedLenFeature([], tf.int64), "meta": tf.io.FixedLenFeature([], tf.string)}

    def _info(self):
        return self._dataset_info({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "width": tfds.features.Tensor(shape=(), dtype=np.int64),
            "height": tfds.features.Tensor(shape=(), dtype=np.int64),
            "boxes": tfds.features.Tensor(shape=(None,), dtype=np.int64),
            "left_right": tfds.features.Tensor(shape=(), dtype=np.int64),
            "meta": tfds.features.Text(),
        })

    def _examples(self, inputs):
        recipe = self.builder_config.recipe
        return region_examples(inputs, image_field=recipe["image_field"], image_root=recipe["image_root"],
                               counter=self.counter)


def region_jsonl(splits: dict[str, list[str]], data_dir: str, *, image_field: str = "binary",
                 image_root: str = "") -> sources.Source:
    """Build (once) and open region json-lines; ``splits`` = {split: [paths]}."""
    splits = {name: [sources._absolute(p) for p in paths] for name, paths in splits.items()}
    sources._check_files(splits)
    if image_root:
        image_root = sources._absolute(image_root)
    recipe = {"splits": splits, "image_field": image_field, "image_root": image_root, "kind": "region"}
    config = sources.RecipeConfig(name=sources._fingerprint(recipe), recipe_json=json.dumps(recipe, sort_keys=True))
    return sources._prepare(RegionJsonl(config=config, data_dir=data_dir))


# ----------------------------------------------------------------------------- one image (tf.data)

def crop_around_box(example, uniforms, image_res: int, careful_hflip: bool):
    """Step 1 of the sampling for a decoded ``RegionJsonl`` example and ``CROP_UNIFORMS`` U(0, 1) numbers.

    Returns ``image`` uint8 (image_res, image_res, 3), ``crop`` int32 (4,) = (x0, y0, w0, h0) in original pixels,
    ``flip`` bool. ``randint(a, b)`` of the reference is a + floor(u * (b - a + 1)).
    """
    boxes = tf.reshape(tf.cast(example["boxes"], tf.int32), [-1, 4])
    width, height = tf.cast(example["width"], tf.int32), tf.cast(example["height"], tf.int32)
    count = tf.shape(boxes)[0]

    def randint(low, high, u):
        return low + tf.minimum(tf.cast(tf.floor(u * tf.cast(high - low + 1, tf.float32)), tf.int32), high - low)

    chosen = boxes[tf.minimum(tf.cast(uniforms[0] * tf.cast(count, tf.float32), tf.int32), count - 1)]
    x, y, w, h = chosen[0], chosen[1], chosen[2], chosen[3]
    x0, y0 = randint(0, x, uniforms[1]), randint(0, y, uniforms[2])
    x1 = randint(tf.minimum(x + w, width), width, uniforms[3])
    y1 = randint(tf.minimum(y + h, height), height, uniforms[4])
    crop = tf.stack([x0, y0, x1 - x0, y1 - y0])
    image = image_lib._decode_window(example["image"], tf.stack([y0, x0, y1 - y0, x1 - x0]))
    image = image_lib.resize_bicubic(image, image_res)
    flip = uniforms[5] < 0.5
    if careful_hflip:
        flip = flip & tf.equal(example["left_right"], 0)
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    return {"image": tf.ensure_shape(image, (image_res, image_res, 3)), "crop": crop, "flip": flip}


# ----------------------------------------------------------------------------- rows (numpy)

def transform_box(box: Sequence[int], crop: Sequence[int], flip: bool, image_res: int,
                  min_perc_in_image: float) -> tuple[float, float, float, float] | None:
    """The part of ``box`` (x, y, w, h) inside ``crop`` (x0, y0, w0, h0), in the flipped and resized frame of
    ``image_res`` pixels; None when at most ``min_perc_in_image`` of the box's area is inside."""
    x, y, w, h = box
    x0, y0, w0, h0 = crop
    xx, yy = max(x0, x), max(y0, y)
    xm, ym = min(x0 + w0, x + w), min(y0 + h0, y + h)
    if not (xm > xx and ym > yy) or (xm - xx) * (ym - yy) / (w * h) <= min_perc_in_image:
        return None
    x, y, w, h = xx - x0, yy - y0, xm - xx, ym - yy
    if flip:
        x = (w0 - x) - w
    return image_res / w0 * x, image_res / h0 * y, image_res / w0 * w, image_res / h0 * h


def patch_mask(box: Sequence[float], image_res: int, patch_size: int) -> np.ndarray:
    """The reference ``get_image_attns``: int32 (1 + n^2,), n = image_res / patch_size (see the module docstring)."""
    n = image_res // patch_size
    x, y, w, h = box
    x_min = min(math.floor(x / patch_size), n - 1)
    x_max = max(x_min + 1, min(math.ceil((x + w) / patch_size), n))
    y_min = min(math.floor(y / patch_size), n - 1)
    y_max = max(y_min + 1, min(math.ceil((y + h) / patch_size), n))
    grid = np.zeros((n, n), np.int32)
    grid[y_min:y_max, x_min:x_max] = 1
    return np.concatenate([[1], grid.reshape(-1)]).astype(np.int32)


def target_box(box: Sequence[float], image_res: int) -> tuple[float, float, float, float]:
    """(cx, cy, w, h) / image_res of a pixel box (x, y, w, h)."""
    x, y, w, h = box
    return (x + w / 2) / image_res, (y + h / 2) / image_res, w / image_res, h / image_res


def choose_text(pairs, languages: Sequence[str], rng: np.random.Generator) -> tuple[str, str] | None:
    """(language, text): a language uniformly among the allowed ones of ``pairs``, then a text in it."""
    allowed = [(lang, text) for lang, text in pairs if not languages or lang in languages]
    if not allowed:
        return None
    langs = sorted({lang for lang, _ in allowed})
    lang = langs[rng.integers(len(langs))]
    texts = [text for la, text in allowed if la == lang]
    return lang, texts[rng.integers(len(texts))]


def image_rows(meta: dict, crop, flip: bool, rng: np.random.Generator, *, image_res: int, max_regions: int,
               min_perc_in_image: float, languages: Sequence[str] = ()) -> list[tuple]:
    """Step 2: [(text, box in image_res pixels or None for the whole image)] of one sampled image; ``meta`` as
    stored (``caption``, ``elems``, ``boxes``)."""
    rows = []
    whole = choose_text(meta["caption"], languages, rng)
    if whole is not None:
        rows.append((whole[1], None))
    for e in rng.permutation(len(meta["elems"])):
        if len(rows) >= max_regions:
            break
        box = transform_box(meta["boxes"][e], crop, flip, image_res, min_perc_in_image)
        chosen = choose_text(meta["elems"][e]["caption"], languages, rng) if box is not None else None
        if chosen is None:
            continue
        lang, text = chosen
        attributes = meta["elems"][e]["attributes"]
        if attributes:
            same = [p for p in attributes if p[0] == lang]
            text = (choose_text(same or attributes, (), rng)[1]) + " " + text
        rows.append((text, box))
    return rows


def batch_rows(rows_per_image: Sequence[list], batch_size: int, rng: np.random.Generator, *, image_res: int,
               patch_size: int) -> tuple[list[str], dict[str, np.ndarray]]:
    """Step 3: the texts and the row arrays (``idx_to_group_img``, ``image_atts``, ``target_bbox``, ``is_image``,
    ``valid``) of ``batch_size`` rows drawn from every image's rows."""
    flat = [(i, text, box) for i, rows in enumerate(rows_per_image) for text, box in rows]
    if not flat:
        raise ValueError("a region batch without rows")
    order = rng.permutation(len(flat))[:batch_size]
    valid = np.arange(batch_size) < len(order)
    pick = order[np.arange(batch_size) % len(order)]
    n = image_res // patch_size
    out = {"idx_to_group_img": np.zeros(batch_size, np.int32), "image_atts": np.ones((batch_size, 1 + n * n), np.int32),
           "target_bbox": np.tile(np.float32(WHOLE_IMAGE_BOX), (batch_size, 1)),
           "is_image": np.ones(batch_size, np.int32), "valid": valid}
    texts = []
    for r, k in enumerate(pick):
        image, text, box = flat[k]
        texts.append(text)
        out["idx_to_group_img"][r] = image
        if box is not None:
            out["image_atts"][r] = patch_mask(box, image_res, patch_size)
            out["target_bbox"][r] = target_box(box, image_res)
            out["is_image"][r] = 0
    return texts, out


def augment_images(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RandomAugment(2, 7) over ``REGION_AUGMENTS`` (photometric) of each uint8 (N, H, W, 3) image."""
    ops = randaugment.REGION_AUGMENTS
    op_ids, apply, signs = randaugment.draw_ops(rng, images.shape[0], num_choices=len(ops))
    out = np.empty_like(images)
    for k in range(images.shape[0]):
        out[k] = randaugment.random_augment_numpy(images[k], op_ids[k], apply[k], signs[k], ops=ops)
    return out

