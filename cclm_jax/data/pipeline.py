"""tf.data pipelines: per-host training batches with exact resume, and the retrieval dev set.

``build_train_pipelines(data_config, tokenizer, process_index=0, process_count=1)`` returns
``{kind: BatchIterator}`` for every kind with a positive ratio in ``data_config.mix``. Each
iterator yields dicts of numpy arrays with a static per-host batch size (remainder dropped):

* ``image_caption``: ``image`` uint8 (B, R, R, 3); ``text_ids``, ``text_atts``,
  ``text_ids_masked`` int32 (B, max_tokens); ``masked_pos`` int32 (B, max_masks) padded 0;
  ``masked_ids`` int32 (B, max_masks) padded -100; with ``sample_2_captions`` the same five
  text keys again with suffix ``_2`` for a caption in another language (the first caption again
  when the image has no other language).
* ``parallel_text``: the five text keys for sentence 1 and, with suffix ``_2``, for sentence 2
  (both masked; the order of each pair is swapped with probability 0.5).

One pipeline per source: host shard (``tfds.even_splits``, equal sizes) -> per-epoch shuffle
of the serialized records (buffer ``shuffle_buffer``, seed from (seed, kind, host, epoch)) ->
image–caption: per example, parse, crop/resize/flip and caption choice from one stateless draw
seeded by (seed, kind, host, example position) -> batch -> RandomAugment; parallel text: batch
-> parse -> pair swap; then tokenisation and masking; the per-batch steps run in one numpy call
seeded by (seed, kind, host, batch number) -> prefetch. Everything random is a
function of positions, so ``get_state()`` is two counters (``{"batches", "next_example",
"batch_size"}`` as numpy int64) and ``set_state`` rebuilds the pipeline at that position: the
resumed iterator yields bitwise the batches an uninterrupted one would. Restoring reads and
drops the records of the current epoch before the position (no decoding).

``build_host_pipelines(data_config, tokenizer, process_index, process_count)`` is what a training
process reads: ``{kind: HostBatches}``, the concatenation (in shard order) of the batches of the
``data.host_shards / process_count`` input shards of this process, each shard a
``build_train_pipelines(..., process_index=shard, process_count=host_shards)`` iterator.

``build_retrieval_eval(data_config, tokenizer)`` returns a ``RetrievalData`` with every caption
of the dev images per language (``text_ids``, ``text_atts``, ``image_index``) and
``image_batches()`` yielding ``image`` uint8 (B, R, R, 3), ``image_index`` int32 (B,) and
``valid`` bool (B,) (eval transform, last batch padded).
"""
import atexit
import dataclasses
import json
import os
import weakref
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from cclm_jax.data import builders, randaugment, sources
from cclm_jax.data import demo as demo_lib
from cclm_jax.data import image as image_lib
from cclm_jax.data import prepare as prepare_lib
from cclm_jax.data import region as region_lib
from cclm_jax.data.config import resolve_host_shards, validate_data_config
from cclm_jax.data.mixture import Mixture
from cclm_jax.data.text import mask_batch, pad_batch, pre_caption
from cclm_jax.data.tokenizer import Tokenizer

_KIND_SALT = {"image_caption": 1, "parallel_text": 2, "region": 3}
_EPOCHS = 1 << 40
# Captions that pre_caption would empty: only punctuation and (Unicode) white space.
_EMPTY_CAPTION = r"[\s\v\x{1c}-\x{1f}\x{85}\p{Z},.'!?\"()*#:;~\-/]*"
_TEXT_KEYS = ("text_ids", "text_atts", "text_ids_masked", "masked_pos", "masked_ids")


# ----------------------------------------------------------------------------- opening sources

def _demo_paths(cfg) -> dict[str, str]:
    spec = demo_lib.DemoSpec(**cfg.demo.to_dict())
    return demo_lib.prepare_demo(os.path.join(os.path.expanduser(cfg.data_dir), "demo"), spec)


def load_tokenizer(cfg) -> Tokenizer:
    """The tokenizer named by ``cfg.tokenizer`` (a model path, or "demo")."""
    if cfg.tokenizer == "demo":
        return Tokenizer(_demo_paths(cfg)["spm"], key="config.data.tokenizer='demo'")
    return Tokenizer(cfg.tokenizer, key="config.data.tokenizer")


def _tfds_dir(cfg) -> str:
    return os.path.join(os.path.expanduser(cfg.data_dir), "tfds")


def open_image_caption(cfg, section: str):
    """(Source, split) of reader section ``image_caption`` or ``eval``."""
    reader = cfg[section]
    if reader.kind == "tfds" and builders.is_prepared_name(reader.tfds_name):
        return builders.open_prepared(reader.tfds_name, reader.tfds_data_dir or _tfds_dir(cfg)), reader.tfds_split
    if reader.kind == "img2dataset":  # small runs: prepared in this process on first use
        return builders.source_of(builders.prepare(prepare_lib.section_recipe(cfg, section), _tfds_dir(cfg))), "train"
    if reader.kind == "tfds":
        source = sources.catalog_image_caption(
            reader.tfds_name, image_feature=reader.image_feature,
            caption_feature=reader.caption_feature, language=reader.tfds_language,
            data_dir=reader.tfds_data_dir or None)
        return source, reader.tfds_split
    if reader.kind == "demo":
        split = "train" if section == "image_caption" else "val"
        paths, fields, image_field, root = [_demo_paths(cfg)[split]], {"caption": ""}, "binary", ""
    else:
        paths, fields = list(reader.paths), reader.caption_fields.to_dict() or {"caption": ""}
        image_field, root = reader.image_field, reader.image_root
    source = sources.image_caption_jsonl({"train": paths}, _tfds_dir(cfg), image_field=image_field,
                                         caption_fields=fields, image_root=root)
    return source, "train"


def open_parallel_text(cfg):
    """(Source, split) of the ``parallel_text`` section."""
    section = cfg.parallel_text
    if section.kind == "tfds":
        return builders.open_prepared(section.tfds_name, section.tfds_data_dir or _tfds_dir(cfg)), section.tfds_split
    if section.kind == "wikimatrix":
        recipe = prepare_lib.section_recipe(cfg, "parallel_text")
        return builders.source_of(builders.prepare(recipe, _tfds_dir(cfg))), "train"
    entries = [_demo_paths(cfg)["parallel"]] if section.kind == "demo" else [
        p if isinstance(p, str) else list(p) for p in section.paths]
    return sources.parallel_text({"train": entries}, _tfds_dir(cfg)), "train"


def open_region(cfg):
    """(Source, split) of the ``region`` section."""
    section = cfg.region
    paths = [_demo_paths(cfg)["region_train"]] if section.kind == "demo" else list(section.paths)
    source = region_lib.region_jsonl({"train": paths}, _tfds_dir(cfg), image_field=section.image_field,
                                     image_root=section.image_root)
    return source, "train"


# ----------------------------------------------------------------------------- per-example maps

def _allowed_captions(example, languages):
    """bool (n,): captions in ``languages`` (all when empty) that cleaning does not empty."""
    captions = example["captions"]
    usable = tf.logical_not(tf.strings.regex_full_match(captions, _EMPTY_CAPTION))
    if languages:
        wanted = tf.constant(list(languages), tf.string)
        usable &= tf.reduce_any(tf.equal(example["languages"][:, None], wanted[None, :]), axis=1)
    return usable


def choose_caption(languages, allowed, uniforms):
    """Index (int64) of a caption from two U(0, 1) numbers: a language uniformly among the
    allowed captions' languages, then a caption uniformly among the allowed ones in it."""
    index = tf.where(allowed)[:, 0]
    unique, which = tf.unique(tf.gather(languages, index))
    def scaled(u, n):  # floor(u * n) in [0, n)
        return tf.minimum(tf.cast(u * tf.cast(n, tf.float32), tf.int32), n - 1)

    candidates = tf.boolean_mask(index, tf.equal(which, scaled(uniforms[0], tf.size(unique))))
    return candidates[scaled(uniforms[1], tf.size(candidates))]


_EXAMPLE_UNIFORMS = image_lib.TRAIN_UNIFORMS + 4  # image, then two per caption


def _image_caption_map(reader, languages, base_seed, sample_2):
    """Per example, from one draw of U(0, 1) numbers seeded by its position: crop, resize and
    flip the image, choose the caption(s). RandomAugment runs per batch (``_batch_stage``)."""
    def fn(position, example):
        u = tf.random.stateless_uniform(
            [_EXAMPLE_UNIFORMS], tf.random.experimental.stateless_fold_in(base_seed, position))
        cut = image_lib.TRAIN_UNIFORMS
        allowed = _allowed_captions(example, languages)
        first = choose_caption(example["languages"], allowed, u[cut:cut + 2])
        out = {
            "image": image_lib.crop_resize_flip(example["image"], u[:cut], reader.image_res,
                                                tuple(reader.crop_scale)),
            "caption": example["captions"][first],
            "_position": position,
        }
        if sample_2:
            other = allowed & tf.not_equal(example["languages"], example["languages"][first])
            second = tf.cond(tf.reduce_any(other),
                             lambda: choose_caption(example["languages"], other, u[cut + 2:cut + 4]),
                             lambda: first)
            out["caption_2"] = example["captions"][second]
        return out
    return fn


# ----------------------------------------------------------------------------- text stage

@dataclasses.dataclass(frozen=True)
class TextSettings:
    """Cleaning, tokenisation and masking of one text field."""

    max_tokens: int
    max_words: int
    max_masks: int
    mask_prob: float

    def encode(self, tokenizer: Tokenizer, captions) -> tuple:
        """bytes (B,) -> (text_ids, text_atts) int32 (B, max_tokens)."""
        texts = [pre_caption(c.decode("utf-8"), self.max_words) for c in captions]
        return pad_batch(tokenizer.encode_batch(texts), self.max_tokens)

    def encode_and_mask(self, tokenizer: Tokenizer, captions, rng: np.random.Generator) -> tuple:
        """bytes (B,) -> the five ``_TEXT_KEYS`` arrays (int32)."""
        ids, atts = self.encode(tokenizer, captions)
        masked = mask_batch(ids, atts, rng, vocab_size=tokenizer.vocab_size, mask_id=tokenizer.mask_id,
                            mask_prob=self.mask_prob, max_masks=self.max_masks)
        return (ids, atts) + tuple(masked)


_SWAP_STREAM = 2
_AUGMENT_STREAM = 3


def _augment_batch(images, rng: np.random.Generator):
    """RandomAugment(2, 7) each image of a uint8 (B, H, W, 3) batch."""
    op_ids, apply, signs = randaugment.draw_ops(rng, images.shape[0])
    out = np.empty_like(images)
    for k in range(images.shape[0]):
        out[k] = randaugment.random_augment_numpy(images[k], op_ids[k], apply[k], signs[k])
    return out


def _batch_stage(tokenizer, settings: TextSettings, fields, seed_words, swap: bool = False,
                 augment: bool = False):
    """Batch map, one host call per batch, seeded by the batch number: RandomAugment the
    images (when ``augment``), then tokenise and mask the text ``fields`` (numpy). The first
    field gives the un-suffixed keys, the second the ``_2`` keys. With ``swap`` the two fields
    trade places in a random half of the rows first.
    """
    def rng(batch_number, stream):
        return np.random.default_rng([*seed_words, int(batch_number), stream])

    def run(batch_number, *arrays):
        outputs = []
        if augment:
            outputs.append(_augment_batch(arrays[0], rng(batch_number, _AUGMENT_STREAM)))
            arrays = arrays[1:]
        texts = arrays
        if swap:
            flip = rng(batch_number, _SWAP_STREAM).random(len(texts[0])) < 0.5
            texts = (np.where(flip, texts[1], texts[0]), np.where(flip, texts[0], texts[1]))
        for stream, values in enumerate(texts):
            outputs.extend(settings.encode_and_mask(tokenizer, values, rng(batch_number, stream)))
        return outputs

    def fn(batch_number, batch):
        inputs = [batch_number]
        types = []
        if augment:
            inputs.append(batch["image"])
            types.append(tf.uint8)
        inputs += [batch[f] for f in fields]
        types += [tf.int32] * (5 * len(fields))
        results = tf.numpy_function(run, inputs, types, stateful=False)
        out = {"_position": batch["_position"]}
        if "image" in batch:
            out["image"] = tf.ensure_shape(results.pop(0), batch["image"].shape) if augment else batch["image"]
        batch_size = batch["_position"].shape[0]
        shapes = [settings.max_tokens] * 3 + [settings.max_masks] * 2
        for i, suffix in enumerate(["", "_2"][:len(fields)]):
            for j, key in enumerate(_TEXT_KEYS):
                out[key + suffix] = tf.ensure_shape(results[5 * i + j], [batch_size, shapes[j]])
        return out
    return fn


# ----------------------------------------------------------------------------- iterator

_OPEN_ITERATORS = weakref.WeakSet()


@atexit.register
def _close_open_iterators():
    """Stop prefetching before interpreter shutdown: tf.data threads still running numpy
    functions at exit abort the process ("terminate called without an active exception")."""
    for iterator in list(_OPEN_ITERATORS):
        iterator.close()


class BatchIterator:
    """Per-host batches of one kind with exact resume (see the module docstring).

    ``make_dataset(start_batch, start_example)`` builds the tf.data pipeline at a position;
    every element carries ``_position`` (int64 (B,), the host-stream position of each example).
    ``skipped`` holds the source's build-time skip counts. ``close()`` stops prefetching (done
    for every open iterator at exit); the next ``next()`` starts again where it stopped.
    """

    def __init__(self, kind: str, make_dataset: Callable[[int, int], tf.data.Dataset],
                 batch_size: int, skipped: dict[str, int]):
        self.kind = kind
        self.batch_size = batch_size
        self.skipped = dict(skipped)
        self._make_dataset = make_dataset
        self._batches = 0
        self._next_example = 0
        self._iterator = None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = iter(self._make_dataset(self._batches, self._next_example))
            _OPEN_ITERATORS.add(self)
        batch = {k: v.numpy() for k, v in next(self._iterator).items()}
        positions = batch.pop("_position")
        self._next_example = int(positions[-1]) + 1
        self._batches += 1
        return batch

    def close(self) -> None:
        """Drop the tf.data iterator and its prefetch threads."""
        self._iterator = None
        _OPEN_ITERATORS.discard(self)

    def get_state(self) -> dict[str, np.ndarray]:
        """Position after the last batch handed out (numpy int64 scalars)."""
        return {"batches": np.int64(self._batches), "next_example": np.int64(self._next_example),
                "batch_size": np.int64(self.batch_size)}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Continue from a ``get_state()`` result (of a pipeline with the same config)."""
        missing = {"batches", "next_example", "batch_size"} - set(state)
        if missing:
            raise ValueError(f"{self.kind}: iterator state lacks {sorted(missing)}")
        if int(state["batch_size"]) != self.batch_size:
            raise ValueError(f"{self.kind}: state was saved with per-host batch size "
                             f"{int(state['batch_size'])}, this pipeline uses {self.batch_size}")
        self._batches = int(state["batches"])
        self._next_example = int(state["next_example"])
        self.close()

    def metrics(self) -> dict[str, int]:
        """Counters to log: examples skipped at build time, by reason."""
        return {f"data/{self.kind}/skipped_{reason}": n for reason, n in sorted(self.skipped.items())}


def _base_seed(seed: int, kind: str, process_index: int):
    base = tf.constant([seed, _KIND_SALT[kind]], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, process_index)


def _shuffled_epochs(records: tf.data.Dataset, size: int, buffer: int, base_seed, start_example: int):
    """Infinite stream of records from host-stream position ``start_example`` on: epoch e is
    ``records`` shuffled with a seed derived from e."""
    def epoch(e):
        seed = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(base_seed, e),
                                           0, tf.int64.max, dtype=tf.int64)
        return records.shuffle(buffer, seed=seed, reshuffle_each_iteration=False)

    first_epoch, offset = divmod(start_example, size)
    return tf.data.Dataset.range(first_epoch, _EPOCHS).flat_map(epoch).skip(offset)


def _host_stream(records: tf.data.Dataset, size: int, buffer: int, base_seed, start_example: int):
    """``_shuffled_epochs`` as (position, record) pairs."""
    stream = _shuffled_epochs(records, size, buffer, base_seed, start_example)
    return tf.data.Dataset.zip(tf.data.Dataset.counter(start_example), stream)


def _options(threads: int) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    if threads:
        options.threading.private_threadpool_size = threads
    return options


def _check_size(kind, size, batch_size):
    if size < batch_size:
        raise ValueError(f"{kind}: the host shard has {size} examples, fewer than the per-host "
                         f"batch size {batch_size}")


def _image_caption_pipeline(cfg, source, split, size, tokenizer, process_index):
    """make(start_batch, start_example) for the image–caption kind: per-example image and
    caption choice (stateless seeds from the example position), then batched text."""
    section = cfg.image_caption
    _check_size("image_caption", size, section.batch_size)
    base_seed = _base_seed(cfg.seed, "image_caption", process_index)
    languages = list(section.languages)
    example_map = _image_caption_map(section, languages, base_seed, section.sample_2_captions)
    fields = ("caption", "caption_2") if section.sample_2_captions else ("caption",)
    settings = TextSettings(section.max_tokens, section.max_words, section.max_masks, section.mask_prob)
    batch_stage = _batch_stage(tokenizer, settings, fields, (cfg.seed, _KIND_SALT["image_caption"], process_index),
                               augment=section.randaugment)
    records = source.raw(split)
    # built json-lines sources hold no empty caption; catalog ones may
    needs_filter = bool(languages) or source.parse_spec is None

    def make(start_batch: int, start_example: int) -> tf.data.Dataset:
        ds = _host_stream(records, size, cfg.shuffle_buffer, base_seed, start_example)
        if needs_filter:
            ds = ds.filter(lambda position, raw: tf.reduce_any(_allowed_captions(source.decode(raw), languages)))
        ds = ds.map(lambda position, raw: example_map(position, source.decode(raw)),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(section.batch_size, drop_remainder=True)
        ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start_batch), ds)
        ds = ds.map(batch_stage, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(cfg.prefetch).with_options(_options(cfg.threads))
    return make


def _parallel_text_pipeline(cfg, source, split, size, tokenizer, process_index):
    """make(start_batch, start_example) for the parallel-text kind: serialized pairs are
    shuffled and batched, then parsed, swapped, tokenised and masked per batch."""
    section = cfg.parallel_text
    _check_size("parallel_text", size, section.batch_size)
    base_seed = _base_seed(cfg.seed, "parallel_text", process_index)
    settings = TextSettings(section.max_tokens, section.max_words, section.max_masks, section.mask_prob)
    batch_stage = _batch_stage(tokenizer, settings, ("text_1", "text_2"),
                             (cfg.seed, _KIND_SALT["parallel_text"], process_index), swap=True)
    records = source.raw(split)

    batch_size = section.batch_size

    def make(start_batch: int, start_example: int) -> tf.data.Dataset:
        def parse(batch_number, raw):  # no filtering here: positions follow from the batch number
            first = start_example + (batch_number - start_batch) * batch_size
            positions = first + tf.range(batch_size, dtype=tf.int64)
            return batch_number, {"_position": positions, **source.decode_batch(raw)}

        ds = _shuffled_epochs(records, size, cfg.shuffle_buffer, base_seed, start_example)
        ds = ds.batch(batch_size, drop_remainder=True)
        ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start_batch), ds)
        ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.map(batch_stage, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(cfg.prefetch).with_options(_options(cfg.threads))
    return make


_ROW_STREAM, _REGION_TEXT_STREAM = 4, 5


def _region_pipeline(cfg, source, split, size, tokenizer, process_index):
    """make(start_batch, start_example) for the region kind (``data.region``; ``cclm_jax.data.region``): per
    image a crop around one box, flip and resize from a stateless draw seeded by its position; per batch of
    ``max_images`` images (seeded by the batch number) RandomAugment, the rows, tokenisation and masking."""
    section = cfg.region
    _check_size("region", size, section.max_images)
    base_seed = _base_seed(cfg.seed, "region", process_index)
    settings = TextSettings(section.max_tokens, section.max_words, section.max_masks, section.mask_prob)
    seed_words = (cfg.seed, _KIND_SALT["region"], process_index)
    languages = tuple(section.languages)
    rows_per_batch, grid = section.batch_size, (section.image_res // section.patch_size) ** 2

    def per_example(position, raw):
        example = source.decode(raw)
        uniforms = tf.random.stateless_uniform([region_lib.CROP_UNIFORMS],
                                               tf.random.experimental.stateless_fold_in(base_seed, position))
        out = region_lib.crop_around_box(example, uniforms, section.image_res, section.careful_hflip)
        return {**out, "meta": example["meta"], "_position": position}

    def run(batch_number, images, crops, flips, metas):
        rng = lambda stream: np.random.default_rng([*seed_words, int(batch_number), stream])  # noqa: E731
        row_rng = rng(_ROW_STREAM)
        rows = [region_lib.image_rows(json.loads(m), c, bool(f), row_rng, image_res=section.image_res,
                                      max_regions=section.max_regions,
                                      min_perc_in_image=section.min_perc_in_image, languages=languages)
                for m, c, f in zip(metas, crops, flips)]
        texts, arrays = region_lib.batch_rows(rows, rows_per_batch, row_rng, image_res=section.image_res,
                                              patch_size=section.patch_size)
        if section.randaugment:
            images = region_lib.augment_images(images, rng(_AUGMENT_STREAM))
        text_arrays = settings.encode_and_mask(tokenizer, [t.encode("utf-8") for t in texts],
                                               rng(_REGION_TEXT_STREAM))
        return [images, arrays["idx_to_group_img"], arrays["image_atts"], arrays["target_bbox"],
                arrays["is_image"], arrays["valid"], *text_arrays]

    keys = ("image", "idx_to_group_img", "image_atts", "target_bbox", "is_image", "valid") + _TEXT_KEYS
    types = [tf.uint8, tf.int32, tf.int32, tf.float32, tf.int32, tf.bool] + [tf.int32] * 5
    shapes = ([None, [rows_per_batch], [rows_per_batch, 1 + grid], [rows_per_batch, 4], [rows_per_batch],
               [rows_per_batch]] + [[rows_per_batch, settings.max_tokens]] * 3
              + [[rows_per_batch, settings.max_masks]] * 2)

    def batch_stage(batch_number, batch):
        results = tf.numpy_function(run, [batch_number, batch["image"], batch["crop"], batch["flip"], batch["meta"]],
                                    types, stateful=False)
        out = {"_position": batch["_position"]}
        for key, value, shape in zip(keys, results, shapes):
            out[key] = tf.ensure_shape(value, batch["image"].shape if shape is None else shape)
        return out

    records = source.raw(split)

    def make(start_batch: int, start_example: int) -> tf.data.Dataset:
        ds = _host_stream(records, size, cfg.shuffle_buffer, base_seed, start_example)
        ds = ds.map(per_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(section.max_images, drop_remainder=True)
        ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start_batch), ds)
        ds = ds.map(batch_stage, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(cfg.prefetch).with_options(_options(cfg.threads))
    return make


def build_train_pipelines(data_config, tokenizer: Tokenizer, *, process_index: int = 0,
                          process_count: int = 1) -> dict[str, BatchIterator]:
    """``{kind: BatchIterator}`` for each kind of ``data_config.mix`` with a positive ratio."""
    validate_data_config(data_config)
    cfg = data_config
    pipelines = {}
    for kind in Mixture(dict(cfg.mix)).kinds:
        if kind == "image_caption":
            source, split = open_image_caption(cfg, kind)
            build = _image_caption_pipeline
        elif kind == "region":
            source, split = open_region(cfg)
            build = _region_pipeline
        else:
            source, split = open_parallel_text(cfg)
            build = _parallel_text_pipeline
        host_split = source.host_split(split, process_index, process_count)
        size = source.num_examples(split) // process_count
        make = build(cfg, source, host_split, size, tokenizer, process_index)
        pipelines[kind] = BatchIterator(kind, make, cfg[kind].batch_size, source.skipped)
    return pipelines


class HostBatches:
    """One process's batches of one kind: the batches of its input shards concatenated along the
    example axis in shard order (``data.host_shards``; see the module docstring).

    ``get_state()`` / ``set_state()`` map each shard index to its ``BatchIterator`` state.
    """

    def __init__(self, shards: dict[int, BatchIterator]):
        if not shards:
            raise ValueError("HostBatches needs at least one shard")
        self.shards = dict(sorted(shards.items()))
        first = next(iter(self.shards.values()))
        self.kind = first.kind
        self.batch_size = sum(it.batch_size for it in self.shards.values())

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(it) for it in self.shards.values()]
        if len(batches) == 1:
            return batches[0]
        if "idx_to_group_img" in batches[0]:  # region rows name their image within their shard's batch
            offsets = np.cumsum([0] + [b["image"].shape[0] for b in batches[:-1]])
            batches = [dict(b, idx_to_group_img=b["idx_to_group_img"] + o) for b, o in zip(batches, offsets)]
        return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}

    def close(self) -> None:
        for it in self.shards.values():
            it.close()

    def get_state(self) -> dict[int, dict[str, np.ndarray]]:
        """``{shard index: BatchIterator.get_state()}`` for the shards of this process."""
        return {shard: it.get_state() for shard, it in self.shards.items()}

    def set_state(self, states: dict[int, dict[str, np.ndarray]]) -> None:
        """Continue from ``{shard index: state}`` (it may hold other processes' shards too)."""
        missing = sorted(set(self.shards) - set(states))
        if missing:
            raise ValueError(f"{self.kind}: no data position for input shard(s) {missing}; the state has "
                             f"shards {sorted(states)} (was config.data.host_shards changed?)")
        for shard, it in self.shards.items():
            it.set_state(states[shard])

    def metrics(self) -> dict[str, int]:
        """The source's build-time skip counts (the same for every shard)."""
        return next(iter(self.shards.values())).metrics()


def build_host_pipelines(data_config, tokenizer: Tokenizer, *, process_index: int = 0,
                         process_count: int = 1) -> dict[str, HostBatches]:
    """``{kind: HostBatches}`` of process ``process_index`` of ``process_count``: input shards
    ``p*k .. p*k+k-1`` of ``data.host_shards`` (k = host_shards / process_count)."""
    shards = resolve_host_shards(data_config, process_count)
    per_process = shards // process_count
    mine = range(process_index * per_process, (process_index + 1) * per_process)
    by_shard = {s: build_train_pipelines(data_config, tokenizer, process_index=s, process_count=shards)
                for s in mine}
    kinds = next(iter(by_shard.values()))
    return {kind: HostBatches({s: pipes[kind] for s, pipes in by_shard.items()}) for kind in kinds}


# ----------------------------------------------------------------------------- retrieval dev set

@dataclasses.dataclass
class RetrievalData:
    """Dev images with all their captions.

    ``texts[lang]`` = {``text_ids``, ``text_atts``: int32 (N, max_tokens), ``image_index``:
    int32 (N,)}; ``num_images``; ``image_batches()`` (see the module docstring).
    """

    num_images: int
    texts: dict[str, dict[str, np.ndarray]]
    batch_size: int
    _images: tf.data.Dataset
    skipped: dict[str, int]

    def image_batches(self) -> Iterator[dict[str, np.ndarray]]:
        for batch in self._images:
            batch = {k: v.numpy() for k, v in batch.items()}
            n = batch["image"].shape[0]
            if n < self.batch_size:
                pad = self.batch_size - n
                batch = {"image": np.pad(batch["image"], ((0, pad), (0, 0), (0, 0), (0, 0))),
                         "image_index": np.pad(batch["image_index"], (0, pad))}
            batch["valid"] = np.arange(self.batch_size) < n
            yield batch


def build_retrieval_eval(data_config, tokenizer: Tokenizer, *, section: str = "eval") -> RetrievalData:
    """The retrieval dev set of reader section ``section`` (default ``eval``)."""
    cfg = data_config
    reader = cfg[section]
    source, split = open_image_caption(cfg, section)
    records = source.read(split)
    settings = TextSettings(reader.max_tokens, reader.max_words, 1, 0.5)
    languages = list(reader.languages)
    by_language: dict[str, list] = {}
    num_images = 0
    for example in records.map(lambda ex: {"captions": ex["captions"], "languages": ex["languages"],
                                           "allowed": _allowed_captions(ex, languages)}):
        for text, lang, ok in zip(example["captions"].numpy(), example["languages"].numpy(),
                                  example["allowed"].numpy()):
            if ok:
                by_language.setdefault(lang.decode("utf-8"), []).append((text, num_images))
        num_images += 1
    texts = {}
    for lang, pairs in sorted(by_language.items()):
        ids, atts = settings.encode(tokenizer, [t for t, _ in pairs])
        texts[lang] = {"text_ids": ids, "text_atts": atts,
                       "image_index": np.array([i for _, i in pairs], np.int32)}
    images = tf.data.Dataset.zip(tf.data.Dataset.range(num_images), records).map(
        lambda i, ex: {"image": image_lib.eval_image(ex["image"], reader.image_res),
                       "image_index": tf.cast(i, tf.int32)},
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    images = images.batch(reader.batch_size).prefetch(2).with_options(_options(cfg.threads))
    return RetrievalData(num_images, texts, reader.batch_size, images, source.skipped)
