"""Readers of public parallel-text releases, yielding canonical parallel records.

* WikiMatrix (Schwenk et al. 2019; ``WikiMatrix.<l1>-<l2>.tsv.gz``): ``score<TAB>sentence in
  l1<TAB>sentence in l2`` per line, sorted by the LASER margin score. Pairs scoring below
  ``min_score`` are dropped (the authors recommend 1.04) and counted as ``below_min_score``; the
  language pair comes from the file name unless ``languages`` gives it.
* OPUS Moses-style aligned files (``<corpus>.<l1>-<l2>.<l1>`` beside ``...<l2>``): line-aligned
  text pairs, the ``aligned_text`` kind (``cclm_jax.data.sources.parallel_text_examples``).

Image–caption releases (CC3M, its UC2 translations) are downloaded with img2dataset and read by
``cclm_jax.data.img2dataset``; COCO / Visual Genome region records belong to the region data.

Each reader yields ``(location, example)`` with ``text_1``, ``text_2``, ``lang_1``, ``lang_2`` and
counts every dropped line once through ``counter.skip(reason, location, detail)`` under one of
``SKIPS``. Paths may be local or any ``tf.io.gfile`` URL; ``.gz`` is read transparently.
"""
import gzip
import re
from collections.abc import Iterator

import tensorflow as tf

from cclm_jax.data.img2dataset import usable_text

SKIPS = ("invalid_utf8", "missing_field", "invalid_score", "below_min_score", "empty_text")
_PAIR = re.compile(r"\.([A-Za-z_]+)-([A-Za-z_]+)\.tsv(\.gz)?$")


def wikimatrix_languages(path: str) -> tuple[str, str]:
    """(l1, l2) of a ``WikiMatrix.<l1>-<l2>.tsv[.gz]`` file name (ValueError naming the file otherwise)."""
    match = _PAIR.search(path)
    if match is None:
        raise ValueError(f"{path!r}: cannot tell the language pair from the name (expected "
                         "WikiMatrix.<l1>-<l2>.tsv[.gz]); set the languages explicitly")
    return match.group(1), match.group(2)


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    with tf.io.gfile.GFile(path, "rb") as raw:
        f = gzip.open(raw) if path.endswith(".gz") else raw
        for number, line in enumerate(f, start=1):
            yield number, line.rstrip(b"\r\n")


def wikimatrix_examples(path: str, *, min_score: float = 1.04, languages: tuple[str, str] | None = None,
                        counter) -> Iterator[tuple[str, dict]]:
    """(location, parallel example) of every line of a WikiMatrix TSV scoring >= ``min_score``."""
    lang_1, lang_2 = tuple(languages) if languages else wikimatrix_languages(path)
    for number, raw in _lines(path):
        where = f"{path}:{number}"
        if not raw.strip():
            continue
        try:
            columns = raw.decode("utf-8").split("\t")
        except UnicodeDecodeError as e:
            counter.skip("invalid_utf8", where, str(e))
            continue
        if len(columns) < 3:
            counter.skip("missing_field", where, f"needs score<TAB>{lang_1}<TAB>{lang_2}, got {len(columns)} column(s)")
            continue
        try:
            score = float(columns[0])
        except ValueError:
            counter.skip("invalid_score", where, f"score {columns[0]!r} is not a number")
            continue
        if score < min_score:
            counter.skip("below_min_score", where, f"{score} < {min_score}")
            continue
        if not (usable_text(columns[1]) and usable_text(columns[2])):
            counter.skip("empty_text", where)
            continue
        yield where, {"text_1": columns[1], "text_2": columns[2], "lang_1": lang_1, "lang_2": lang_2}
