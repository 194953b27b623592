"""Data sources: TFDS builders that build offline from local files, and catalog readers.

Every source yields examples in one of two canonical forms (tf.data dicts):

* image–caption: ``image`` tf.string (encoded bytes), ``captions`` tf.string (n,),
  ``languages`` tf.string (n,) -- every caption of the image with its language code.
* parallel text: ``text_1``, ``text_2``, ``lang_1``, ``lang_2`` tf.string scalars.

Captions and sentences are stored as raw text; cleaning (``pre_caption``), tokenisation and
masking happen in the pipeline, so a built dataset does not depend on the tokenizer.

Builders (``tfds.core.GeneratorBasedBuilder``; one config per set of input files, named by a
hash of the recipe and of the files' sizes and mtimes, so changed inputs rebuild):

The key of a json-lines source whose records name image files (``image_root`` set) also covers those files'
sizes and mtimes (one stat per record at every start, no image read), so a repaired or replaced image rebuilds
the data instead of keeping its old "corrupt" or "missing" verdict.

* ``ImageCaptionJsonl`` -- CCLM json-lines, one object per line. ``image_field`` (default
  ``binary``) holds base64 image bytes, or a path when ``image_root`` is set (relative paths
  are resolved against ``image_root``). ``caption_fields`` maps a field name to a language:
  ``""`` means the field holds ``{lang: text or [texts]}`` or a list of such dicts (the
  CCLM ``caption`` layout); a language code means the field holds a text or a list of texts in
  that language (e.g. ``{"multi30k_task1": "", "flickr8kcn_zh": "zh"}`` for Flickr8k).
* ``ParallelText`` -- parallel sentences from json-lines (``source_text``/``target_text``,
  optional ``source_lang``/``target_lang``) or from line-aligned text file pairs (``.gz`` is
  read transparently; the language is the file's last suffix, e.g. ``train.de.gz`` -> ``de``).
* ``catalog_image_caption`` -- any prepared TFDS catalog dataset with an image feature and a
  caption feature (``/`` separates nested feature names, e.g. ``captions/text``).

Bad input is skipped and counted, never silently lost and never a crash. Each skipped record
(line or aligned line pair) counts once under one of ``RECORD_SKIPS``; captions dropped from a
record count under ``CAPTION_DROPS`` (a record left without captions then counts as
``no_caption``). Blank lines are not records. The counts are stored in the dataset's TFDS
metadata (written with the data), logged with file:line for the first few cases, and exposed as
``Source.skipped``. A source with no usable example, or aligned files of different lengths,
raise ``ValueError`` naming the files.
"""
import abc
import base64
import binascii
import collections
import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import pathlib
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cclm_jax.data import image as image_lib
from cclm_jax.data.text import pre_caption

RECORD_SKIPS = ("invalid_utf8", "invalid_json", "missing_field", "missing_image_file",
                "corrupt_image", "no_caption", "empty_text")
CAPTION_DROPS = ("empty_caption", "invalid_caption")
_LOG = logging.getLogger(__name__)
_MAX_LOGGED_SKIPS = 10
_WORD_LIMIT = 1 << 30  # only emptiness matters at build time; max_words applies at run time


# ----------------------------------------------------------------------------- skip counting

class SkipCounter:
    """Counts skipped records by reason; logs the first few with their location."""

    def __init__(self):
        self.counts = collections.Counter()

    def skip(self, reason: str, where: str, detail: str = ""):
        self.counts[reason] += 1
        if self.counts[reason] <= _MAX_LOGGED_SKIPS:
            _LOG.warning("skipping %s (%s)%s", where, reason, f": {detail}" if detail else "")


def _read_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without newline) of a text file, ``.gz`` transparently."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            yield number, line.rstrip(b"\r\n")


def _is_usable_text(text) -> bool:
    if not isinstance(text, str):
        return False
    try:
        pre_caption(text, _WORD_LIMIT)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------- json-lines parsing

def _json_records(path: str, counter: SkipCounter) -> Iterator[tuple[str, dict]]:
    """(location, object) for each parsable non-blank line of a json-lines file."""
    for number, raw in _read_lines(path):
        where = f"{path}:{number}"
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            counter.skip("invalid_utf8", where, str(e))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            counter.skip("invalid_json", where, str(e))
            continue
        if not isinstance(record, dict):
            counter.skip("invalid_json", where, "a line must hold a JSON object")
            continue
        yield where, record


def _caption_pairs(value, language: str) -> list[tuple[str, object]] | None:
    """(language, text) pairs of one caption field; None when the layout is not recognised."""
    if language:
        texts = value if isinstance(value, list) else [value]
        return [(language, t) for t in texts]
    groups = value if isinstance(value, list) else [value]
    pairs = []
    for group in groups:
        if not isinstance(group, dict):
            return None
        for lang, texts in group.items():
            for text in texts if isinstance(texts, list) else [texts]:
                pairs.append((str(lang), text))
    return pairs


def _load_image_bytes(value, image_root: str, where: str, counter: SkipCounter) -> bytes | None:
    if not isinstance(value, str) or not value:
        counter.skip("corrupt_image", where, "image field must be a non-empty string")
        return None
    if image_root:
        path = pathlib.Path(image_root) / value
        try:
            return path.read_bytes()
        except OSError as e:
            counter.skip("missing_image_file", where, str(e))
            return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        counter.skip("corrupt_image", where, f"invalid base64: {e}")
        return None


def image_caption_examples(paths, *, image_field: str, caption_fields: dict[str, str],
                           image_root: str, counter: SkipCounter) -> Iterator[tuple[str, dict]]:
    """(key, canonical image–caption example) for every usable line of ``paths``."""
    for path in paths:
        for where, record in _json_records(path, counter):
            if image_field not in record or not any(f in record for f in caption_fields):
                wanted = [image_field] + list(caption_fields)
                counter.skip("missing_field", where, f"needs {image_field!r} and one of "
                             f"{list(caption_fields)}; has {sorted(record)} (wanted {wanted})")
                continue
            usable = []
            for field, language in caption_fields.items():
                if field not in record:
                    continue
                pairs = _caption_pairs(record[field], language)
                if pairs is None:
                    counter.skip("invalid_caption", where, f"unrecognised layout of field {field!r}")
                    continue
                for lang, text in pairs:
                    if _is_usable_text(text):
                        usable.append((lang, text))
                    else:
                        counter.skip("empty_caption", where, f"{field}[{lang}] = {text!r}")
            if not usable:
                counter.skip("no_caption", where)
                continue
            data = _load_image_bytes(record[image_field], image_root, where, counter)
            if data is None:
                continue
            if not image_lib.is_decodable(data):
                counter.skip("corrupt_image", where, "undecodable image bytes")
                continue
            yield where, {
                "image": data,
                "captions": [t for _, t in usable],
                "languages": [lang for lang, _ in usable],
            }


def _file_language(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    return pathlib.PurePath(name).suffix.lstrip(".") or "und"


def parallel_text_examples(entries, *, counter: SkipCounter) -> Iterator[tuple[str, dict]]:
    """(key, canonical parallel example) for json-lines paths or [path_1, path_2] pairs."""
    for entry in entries:
        if isinstance(entry, str):
            for where, record in _json_records(entry, counter):
                if "source_text" not in record or "target_text" not in record:
                    counter.skip("missing_field", where, "needs source_text and target_text")
                    continue
                text_1, text_2 = record["source_text"], record["target_text"]
                if not (_is_usable_text(text_1) and _is_usable_text(text_2)):
                    counter.skip("empty_text", where)
                    continue
                yield where, {"text_1": text_1, "text_2": text_2,
                              "lang_1": str(record.get("source_lang", "src")),
                              "lang_2": str(record.get("target_lang", "tgt"))}
            continue
        path_1, path_2 = entry
        lang_1, lang_2 = _file_language(path_1), _file_language(path_2)
        lines_2 = _read_lines(path_2)
        for number, raw_1 in _read_lines(path_1):
            follow = next(lines_2, None)
            if follow is None:
                raise ValueError(f"aligned files differ in length: {path_2!r} ends at line "
                                 f"{number - 1}, {path_1!r} goes on")
            where = f"{path_1}:{number} / {path_2}:{number}"
            try:
                text_1, text_2 = raw_1.decode("utf-8"), follow[1].decode("utf-8")
            except UnicodeDecodeError as e:
                counter.skip("invalid_utf8", where, str(e))
                continue
            if not (_is_usable_text(text_1) and _is_usable_text(text_2)):
                counter.skip("empty_text", where)
                continue
            yield where, {"text_1": text_1, "text_2": text_2, "lang_1": lang_1, "lang_2": lang_2}
        if next(lines_2, None) is not None:
            raise ValueError(f"aligned files differ in length: {path_1!r} is shorter than {path_2!r}")


# ----------------------------------------------------------------------------- TFDS builders

@dataclasses.dataclass
class RecipeConfig(tfds.core.BuilderConfig):
    """A builder config carrying a JSON recipe: ``splits`` ({split: inputs}) plus reader options."""

    recipe_json: str = "{}"

    @property
    def recipe(self) -> dict:
        return json.loads(self.recipe_json)


def _referenced_images_digest(paths: list[str], image_field: str, image_root: str) -> str:
    """Hash of (name, size, mtime) of every image file the json-lines `paths` refer to under `image_root` (-1 for
    a missing one): a repaired, replaced or newly copied image changes the data's key, so its old skip verdict
    is not reused. One stat per record (no image is read); records the builder would skip are hashed as they are."""
    digest = hashlib.sha256()
    for path in paths:
        for _, raw in _read_lines(path):
            try:
                value = json.loads(raw).get(image_field) if raw.strip() else None
            except (ValueError, AttributeError):  # undecodable or not an object: the builder skips the record
                continue
            if not isinstance(value, str) or not value:
                continue
            try:
                st = os.stat(os.path.join(image_root, value))
                digest.update(f"{value}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{value}\0-1\n".encode())
    return digest.hexdigest()


def _fingerprint(recipe: dict) -> str:
    """Hash of the recipe, the size and mtime of every input file and, for json-lines that refer to image files
    (`image_root` set), of every referenced image (`_referenced_images_digest`)."""
    stats = []
    for inputs in recipe["splits"].values():
        for entry in inputs:
            for path in [entry] if isinstance(entry, str) else entry:
                st = os.stat(path)
                stats.append((path, st.st_size, int(st.st_mtime)))
    if recipe.get("image_root"):
        paths = [p for inputs in recipe["splits"].values() for p in inputs]
        stats.append(_referenced_images_digest(paths, recipe["image_field"], recipe["image_root"]))
    blob = json.dumps([recipe, stats], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class _RecipeBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared machinery: one split per recipe entry; skip counts kept in the dataset metadata
    (``info.metadata["skipped"]``, written with the data)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    PARSE_SPEC: dict = {}  # tf.io parse spec of the serialized examples

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counter = SkipCounter()

    @abc.abstractmethod
    def _examples(self, inputs) -> Iterator[tuple[str, dict]]:
        """(key, canonical example) for the inputs of one split."""

    def _dataset_info(self, features: dict) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                     metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        del dl_manager
        splits = self.builder_config.recipe["splits"]
        return {split: self._generate_examples(inputs) for split, inputs in splits.items()}

    def _generate_examples(self, inputs):
        produced = 0
        for key, example in self._examples(inputs):
            produced += 1
            yield key, example
        if not produced:
            raise ValueError(f"no usable example in {inputs}; skipped: {dict(self.counter.counts)}")
        self.info.metadata["skipped"] = dict(self.counter.counts)  # cumulative over the splits


class ImageCaptionJsonl(_RecipeBuilder):
    """CCLM json-lines image–caption data (see the module docstring)."""

    PARSE_SPEC = {"image": tf.io.FixedLenFeature([], tf.string),
                  "captions": tf.io.RaggedFeature(tf.string), "languages": tf.io.RaggedFeature(tf.string)}

    def _info(self):
        return self._dataset_info({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "languages": tfds.features.Sequence(tfds.features.Text()),
        })

    def _examples(self, inputs):
        recipe = self.builder_config.recipe
        return image_caption_examples(
            inputs, image_field=recipe["image_field"], caption_fields=recipe["caption_fields"],
            image_root=recipe["image_root"], counter=self.counter)


class ParallelText(_RecipeBuilder):
    """Parallel sentences from json-lines or line-aligned files (see the module docstring)."""

    PARSE_SPEC = {key: tf.io.FixedLenFeature([], tf.string) for key in ("text_1", "text_2", "lang_1", "lang_2")}

    def _info(self):
        return self._dataset_info({
            "text_1": tfds.features.Text(), "text_2": tfds.features.Text(),
            "lang_1": tfds.features.Text(), "lang_2": tfds.features.Text(),
        })

    def _examples(self, inputs):
        return parallel_text_examples(inputs, counter=self.counter)


# ----------------------------------------------------------------------------- sources

@dataclasses.dataclass
class Source:
    """A dataset readable in canonical form.

    ``raw(split)`` -> tf.data.Dataset of raw records in a fixed order: serialized
    ``tf.train.Example`` strings for the builders here (cheap to shuffle; parse after batching
    with ``decode_batch``), canonical dicts for catalog datasets. ``decode(raw)`` -> canonical
    example; ``read(split)`` = ``raw(split).map(decode)``. ``num_examples(split)``;
    ``host_split(split, index, count)`` -> the split of host ``index`` of ``count`` (equal
    sizes, remainder dropped); ``skipped`` -> build-time skip counts.
    """

    builder: tfds.core.DatasetBuilder
    skipped: dict[str, int]
    parse_spec: dict | None = None
    canonicalize: Callable | None = None
    image_feature: str | None = None

    def raw(self, split) -> tf.data.Dataset:
        if self.parse_spec is None:
            decoders = {self.image_feature: tfds.decode.SkipDecoding()} if self.image_feature else None
            ds = self.builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
            return ds.map(self.canonicalize, num_parallel_calls=tf.data.AUTOTUNE)
        instructions = self.builder.info.splits[split].file_instructions
        files = tf.data.Dataset.from_tensor_slices((
            tf.constant([str(i.filename) for i in instructions], tf.string),
            tf.constant([int(i.skip) for i in instructions], tf.int64),
            tf.constant([int(i.take) for i in instructions], tf.int64)))
        return files.flat_map(lambda f, skip, take: tf.data.TFRecordDataset(f).skip(skip).take(take))

    def decode(self, raw):
        if self.parse_spec is None:
            return raw
        return tf.io.parse_single_example(raw, self.parse_spec)

    def decode_batch(self, raw):
        """Batched ``decode`` of serialized records (builders here only)."""
        if self.parse_spec is None:
            raise ValueError("decode_batch reads serialized records; catalog sources are decoded already")
        return tf.io.parse_example(raw, self.parse_spec)

    def read(self, split) -> tf.data.Dataset:
        return self.raw(split).map(self.decode, num_parallel_calls=tf.data.AUTOTUNE)

    def num_examples(self, split) -> int:
        return int(self.builder.info.splits[split].num_examples)

    def host_split(self, split: str, index: int, count: int):
        if not 0 <= index < count:
            raise ValueError(f"process_index {index} is outside [0, {count})")
        if count == 1:
            return split
        return tfds.even_splits(split, n=count, drop_remainder=True)[index]


def _build_quietly(builder: _RecipeBuilder) -> None:
    """`download_and_prepare` with TFDS's progress bars off and its printed messages sent to the log."""
    _LOG.warning("building %s from its input files (once: later runs reuse it)", builder.data_dir)
    tfds.disable_progress_bar()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            builder.download_and_prepare(file_format="tfrecord", download_config=tfds.download.DownloadConfig(
                compute_stats=tfds.download.ComputeStatsMode.SKIP))
    finally:
        if printed.getvalue().strip():
            _LOG.info("tfds: %s", printed.getvalue().strip())


def _prepare(builder: _RecipeBuilder) -> Source:
    """Build once (a concurrent build of the same data by another process is accepted)."""
    if not builder.is_prepared():
        try:
            _build_quietly(builder)
        except (OSError, tf.errors.OpError):
            builder = type(builder)(config=builder.builder_config, data_dir=builder.data_dir_root)
            if not builder.is_prepared():
                raise
            _LOG.info("%s was built by another process", builder.data_dir)
    skipped = builder.info.metadata.get("skipped", {}) if builder.info.metadata else {}
    return Source(builder, dict(skipped), parse_spec=builder.PARSE_SPEC)


def _absolute(entry):
    if isinstance(entry, str):
        return os.path.abspath(os.path.expanduser(entry))
    if len(entry) != 2:
        raise ValueError(f"an aligned parallel-text entry must be [path_1, path_2], got {entry!r}")
    return [_absolute(p) for p in entry]


def _check_files(splits):
    for split, inputs in splits.items():
        if not inputs:
            raise ValueError(f"split {split!r} has no input files")
        for entry in inputs:
            for path in [entry] if isinstance(entry, str) else entry:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"split {split!r}: input file {path!r} does not exist")


def image_caption_jsonl(splits: dict[str, list[str]], data_dir: str, *, image_field: str = "binary",
                        caption_fields: dict[str, str] | None = None, image_root: str = "") -> Source:
    """Build (once) and open CCLM json-lines image–caption data; ``splits`` = {split: [paths]}."""
    splits = {name: [_absolute(p) for p in paths] for name, paths in splits.items()}
    _check_files(splits)
    if image_root:
        image_root = os.path.abspath(os.path.expanduser(image_root))
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"image_root {image_root!r} is not a directory")
    recipe = {"splits": splits, "image_field": image_field, "image_root": image_root,
              "caption_fields": dict(caption_fields or {"caption": ""})}
    config = RecipeConfig(name=_fingerprint(recipe), recipe_json=json.dumps(recipe, sort_keys=True))
    return _prepare(ImageCaptionJsonl(config=config, data_dir=os.path.expanduser(data_dir)))


def parallel_text(splits: dict[str, list], data_dir: str) -> Source:
    """Build (once) and open parallel text; ``splits`` = {split: [jsonl path or [path_1, path_2]]}."""
    splits = {name: [_absolute(e) for e in entries] for name, entries in splits.items()}
    _check_files(splits)
    recipe = {"splits": splits}
    config = RecipeConfig(name=_fingerprint(recipe), recipe_json=json.dumps(recipe, sort_keys=True))
    return _prepare(ParallelText(config=config, data_dir=os.path.expanduser(data_dir)))


def _feature(example, path: str):
    value = example
    for part in path.split("/"):
        if not isinstance(value, dict) or part not in value:
            available = sorted(value) if isinstance(value, dict) else []
            raise KeyError(f"feature {path!r} not found (at {part!r}; available: {available})")
        value = value[part]
    return value


def catalog_image_caption(name: str, *, image_feature: str, caption_feature: str, language: str,
                          data_dir: str | None = None) -> Source:
    """Open a prepared TFDS catalog dataset (``name`` may include a config and version) as an
    image–caption source; nothing is downloaded. Captions get the language ``language``."""
    builder = tfds.builder(name, data_dir=os.path.expanduser(data_dir) if data_dir else None)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r}; build it there first "
            "(e.g. `tfds build`), this pipeline never downloads")
    tensors = builder.info.features.get_tensor_info()
    for feature in (image_feature, caption_feature):
        try:
            _feature(tensors, feature)
        except KeyError as e:
            raise KeyError(f"TFDS dataset {name!r}: {e.args[0]}") from None

    def canonicalize(example):
        captions = tf.reshape(_feature(example, caption_feature), [-1])
        return {"image": _feature(example, image_feature), "captions": captions,
                "languages": tf.fill(tf.shape(captions), language)}

    return Source(builder, {}, canonicalize=canonicalize, image_feature=image_feature)
