"""Readers of img2dataset outputs: webdataset tar shards, parquet and tfrecord, with translations.

img2dataset (github.com/rom1504/img2dataset) downloads an image–caption list (CC3M, CC12M, LAION)
into shards of about 10,000 samples in one of three layouts, all read here without re-encoding
the image bytes:

* ``webdataset``: ``NNNNN.tar`` with members ``KEY.jpg`` (or ``.jpeg``/``.png``/``.webp``),
  ``KEY.txt`` (the caption) and ``KEY.json`` (url, size, status, extra columns); members of one
  sample are consecutive, as webdataset requires.
* ``parquet``: one row per sample with the columns ``key``, ``caption``, ``jpg`` (bytes),
  ``url`` and ``status`` (rows whose ``status`` is not ``success`` were not downloaded).
* ``tfrecord``: one ``tf.train.Example`` per sample with the bytes features ``key``, ``jpg``,
  ``txt`` and the extra columns.

The caption of the shards is in ``caption_language`` (``en`` for CC3M). Translations of the same
captions (UC2 released CC3M in de, fr, cs, zh and ja) join by key: ``translations`` maps a
language to a TSV file in the CC3M layout, ``caption<TAB>url`` per line (``.gz`` read
transparently; further columns ignored), and ``join_field`` names what the second column is
matched against: ``url`` (default; img2dataset keeps it in the json / the ``url`` column) or
``key`` (the sample key). A sample gets every non-empty caption found for it.

Every function yields ``(location, example)`` with the canonical image–caption example of
``cclm_jax.data.sources`` (``image`` bytes, ``captions`` and ``languages`` lists) and counts a
dropped sample once under one of ``SKIPS`` through ``counter.skip(reason, location, detail)``
(captions dropped from a kept sample count as ``empty_caption``). Paths may be local or any
``tf.io.gfile`` URL (``gs://``).
"""
import functools
import gzip
import io
import json
import pathlib
import tarfile
from collections.abc import Iterator

import tensorflow as tf
from google.protobuf import message

from cclm_jax.data import image as image_lib
from cclm_jax.data.text import pre_caption

FORMATS = ("webdataset", "parquet", "tfrecord")
SKIPS = ("missing_image", "corrupt_image", "no_caption", "invalid_json", "invalid_record", "failed_download",
         "corrupt_shard")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_WORD_LIMIT = 1 << 30  # only emptiness matters when reading; max_words applies at training time


def format_of(path: str) -> str:
    """The img2dataset layout of a shard file from its name: ``.tar`` -> webdataset, ``.parquet``,
    ``.tfrecord`` (raises ValueError naming the file otherwise)."""
    name = path.lower()
    for suffix, fmt in ((".tar", "webdataset"), (".parquet", "parquet"), (".tfrecord", "tfrecord")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"{path!r}: not an img2dataset shard (expected .tar, .parquet or .tfrecord)")


def usable_text(text) -> bool:
    """True when ``text`` is a string that caption cleaning leaves non-empty."""
    if not isinstance(text, str):
        return False
    try:
        pre_caption(text, _WORD_LIMIT)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------- translations

def _open_text(path: str):
    raw = tf.io.gfile.GFile(path, "rb")
    return gzip.open(raw) if path.endswith(".gz") else raw


def read_caption_tsv(path: str) -> dict[str, str]:
    """{second column: first column} of a ``caption<TAB>url`` TSV (the CC3M / UC2 layout); lines
    with fewer than two columns or undecodable bytes are ignored (the sample just lacks that
    translation)."""
    table = {}
    with _open_text(path) as f:
        for raw in f:
            try:
                columns = raw.decode("utf-8").rstrip("\r\n").split("\t")
            except UnicodeDecodeError:
                continue
            if len(columns) >= 2:
                table[columns[1]] = columns[0]
    return table


@functools.lru_cache(maxsize=4)
def _translation_tables(translations: tuple) -> tuple:
    """((language, table), ...) of a sorted ``translations`` tuple; cached per process, so a Beam
    worker reads each TSV once for all the shards it handles."""
    return tuple((lang, read_caption_tsv(path)) for lang, path in translations)


# ----------------------------------------------------------------------------- samples

def _example(where: str, image: bytes | None, caption, join_value: str | None, *, caption_language: str,
             translations: dict[str, str], counter) -> dict | None:
    """The canonical example of one sample, or None after counting why it is dropped."""
    if image is None:
        counter.skip("missing_image", where, f"no member or column with one of {IMAGE_EXTENSIONS}")
        return None
    pairs = [(caption_language, caption)] if caption is not None else []
    if join_value is not None:
        for lang, table in _translation_tables(tuple(sorted(translations.items()))):
            if join_value in table:
                pairs.append((lang, table[join_value]))
    usable = []
    for lang, text in pairs:
        if usable_text(text):
            usable.append((lang, text))
        else:
            counter.skip("empty_caption", where, f"{lang} = {text!r}")
    if not usable:
        counter.skip("no_caption", where)
        return None
    if not image_lib.is_decodable(image):
        counter.skip("corrupt_image", where, "undecodable image bytes")
        return None
    return {"image": image, "captions": [t for _, t in usable], "languages": [lang for lang, _ in usable]}


def _decode_text(data: bytes | None, where: str, counter) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        counter.skip("empty_caption", where, f"caption is not UTF-8: {e}")
        return None


def _tar_samples(path: str, counter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of the consecutive members of a webdataset tar; a truncated or
    corrupt tar counts once as ``corrupt_shard`` and ends the shard."""
    key, members = None, {}
    try:
        with tf.io.gfile.GFile(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = pathlib.PurePosixPath(member.name)
                stem, _, extension = name.name.partition(".")
                member_key = str(name.parent / stem)
                if member_key != key:
                    if key is not None:
                        yield key, members
                    key, members = member_key, {}
                members[extension.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        counter.skip("corrupt_shard", path, f"{type(e).__name__}: {e}")
    if key is not None:
        yield key, members


def _json_field(meta, field: str):
    value = meta.get(field) if isinstance(meta, dict) else None
    return None if value is None else str(value)


def webdataset_examples(path: str, *, caption_language: str = "en", translations: dict[str, str] | None = None,
                        join_field: str = "url", counter) -> Iterator[tuple[str, dict]]:
    """(location, example) of every usable sample of a webdataset tar shard (module docstring)."""
    translations = translations or {}
    for key, members in _tar_samples(path, counter):
        where = f"{path}:{key}"
        meta = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                counter.skip("invalid_json", where, str(e))
                continue
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        caption = _decode_text(members.get("txt"), where, counter)
        join_value = pathlib.PurePosixPath(key).name if join_field == "key" else _json_field(meta, join_field)
        example = _example(where, image, caption, join_value, caption_language=caption_language,
                           translations=translations, counter=counter)
        if example is not None:
            yield where, example


def _first(row: dict, names) -> object:
    return next((row[n] for n in names if row.get(n) is not None), None)


def parquet_examples(path: str, *, caption_language: str = "en", translations: dict[str, str] | None = None,
                     join_field: str = "url", counter) -> Iterator[tuple[str, dict]]:
    """(location, example) of every downloaded, usable row of an img2dataset parquet shard."""
    import pyarrow.parquet as pq

    translations = translations or {}
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            table = pq.read_table(io.BytesIO(f.read()))
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on a broken file
        counter.skip("corrupt_shard", path, f"{type(e).__name__}: {e}")
        return
    for number, row in enumerate(table.to_pylist()):
        key = row.get("key")
        where = f"{path}:{key if key is not None else number}"
        if row.get("status") not in (None, "success"):
            counter.skip("failed_download", where, str(row.get("error_message") or row["status"]))
            continue
        caption = _first(row, ("caption", "txt"))
        join_value = (None if key is None else str(key)) if join_field == "key" else _json_field(row, join_field)
        example = _example(where, _first(row, IMAGE_EXTENSIONS), caption, join_value,
                           caption_language=caption_language, translations=translations, counter=counter)
        if example is not None:
            yield where, example


def tfrecord_examples(path: str, *, caption_language: str = "en", translations: dict[str, str] | None = None,
                      join_field: str = "url", counter) -> Iterator[tuple[str, dict]]:
    """(location, example) of every usable ``tf.train.Example`` of an img2dataset tfrecord shard."""
    translations = translations or {}
    number = 0
    try:
        for number, raw in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
            try:
                features = tf.train.Example.FromString(raw).features.feature
            except message.DecodeError as e:
                counter.skip("invalid_record", f"{path}:record {number + 1}", f"not a tf.train.Example: {e}")
                continue
            row = {name: feature.bytes_list.value[0] for name, feature in features.items()
                   if feature.bytes_list.value}
            key = row["key"].decode("utf-8", "replace") if "key" in row else str(number)
            where = f"{path}:{key}"
            caption = _decode_text(_first(row, ("txt", "caption")), where, counter)
            join_value = key if join_field == "key" else (
                row[join_field].decode("utf-8", "replace") if join_field in row else None)
            example = _example(where, _first(row, IMAGE_EXTENSIONS), caption, join_value,
                               caption_language=caption_language, translations=translations, counter=counter)
            if example is not None:
                yield where, example
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        counter.skip("corrupt_shard", f"{path}:record {number + 1}", f"{type(e).__name__}: {e.message}")


READERS = {"webdataset": webdataset_examples, "parquet": parquet_examples, "tfrecord": tfrecord_examples}


def examples(path: str, fmt: str = "", **options) -> Iterator[tuple[str, dict]]:
    """(location, example) of one shard of layout ``fmt`` ("" = from the file name)."""
    return READERS[fmt or format_of(path)](path, **options)
