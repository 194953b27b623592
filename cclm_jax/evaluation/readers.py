"""Readers for the downstream annotation files of CCLM (IGLUE, Multi30K/CCLM json, Flickr8k jsonl).

Every reader returns plain Python records (frozen dataclasses) whose image paths are joined onto an image
root given by the caller; no image is opened. With ``check_images=True`` a reader raises
``FileNotFoundError`` naming the missing image files (count and the first few paths). A malformed record
raises ``AnnotationError`` (a ``ValueError``) naming the file, the line (or record) and the field.

Formats (field names exactly as in the files):
- IGLUE xFlickr&CO / Flickr30K jsonl: ``{"sentences": [str], "id": str, "img_path": str}``; an image whose
  captions are all empty is skipped (as the reference). ``image_root`` may map ``"flickr30k"`` and
  ``"coco"`` to two folders: paths containing ``COCO`` go to the second (xFlickr&CO mixes both).
- IGLUE WIT jsonl: one caption per line (``caption_reference_description``, ``image_url``, ``language``);
  captions are grouped by ``image_url`` in order of first appearance, empty captions skipped. The image
  file is ``image_root/<file name of the URL, percent-decoded>``; a line that carries the reference's
  preprocessed ``image_content`` (base64) keeps it in ``RetrievalImage.image_b64``.
- CCLM retrieval json (Multi30K, COCO): a JSON list of ``{"image": path, "caption": [str] | str}``; a list
  of captions is one image, single-caption records (the training layout) are grouped by ``image``.
- Flickr8k jsonl of ``../shared/data/flickr8k``: one image per line with captions per language.
- XVNLI jsonl: ``Flikr30kID`` (image ``<id>.jpg``), ``sentence1`` (premise, optional), ``sentence2``
  (hypothesis), ``gold_label`` -> {contradiction: 0, entailment: 1, neutral: 2}; SNLI's no-consensus
  label ``"-"`` is skipped (the reference skips it), any other label is an error.
- MaRVL jsonl (``left_img``, ``right_img``, ``caption``, ``label`` bool, ``concept``, ``language``) and the
  CCLM/NLVR2 json list (``images`` [2], ``sentence``, ``label`` bool or "True"/"False").
- GQA/xGQA json: either a JSON object question id -> ``{imageId, question, answer?}`` (xGQA test, dev and
  few-shot files) or a JSON list of ``{question_id, img_id, sent, label: {answer: score}}`` (GQA train).
  Images are ``image_root/<image id>.jpg``. The answer list is the key order of ``trainval_ans2label.json``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

PathLike = str | os.PathLike
ImageRoot = PathLike | Mapping[str, PathLike]

XVNLI_LABELS = {"contradiction": 0, "entailment": 1, "neutral": 2}
XVNLI_NO_LABEL = "-"
MARVL_LAYOUTS = ("zero_shot", "few_shot")
FLICKR8K_FIELDS = ("multi30k_task1", "multi30k_task2", "flickr8k_en", "flickr8kcn_zh")
_MISSING_SHOWN = 5

log = logging.getLogger(__name__)


class AnnotationError(ValueError):
    """A malformed annotation record: ``path``, ``where`` (e.g. "line 3") and ``field`` say which."""

    def __init__(self, path: PathLike, where: str, field: str | None, problem: str):
        self.path, self.where, self.field = os.fspath(path), where, field
        what = f", field '{field}'" if field else ""
        super().__init__(f"{self.path}, {where}{what}: {problem}")


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RetrievalImage:
    """One retrieval image and its ground-truth captions.

    ``image_id``: the dataset's id (Flickr id, COCO file name, WIT image URL); ``image_path``: resolved
    file path; ``captions``: its texts (may be several); ``image_b64``: base64 JPEG when the annotation
    embeds the image (WIT after the reference's preprocessing), else None.
    """
    image_id: str
    image_path: str
    captions: tuple[str, ...]
    image_b64: str | None = None


@dataclasses.dataclass(frozen=True)
class RetrievalSet:
    """A retrieval evaluation (or training) set in the layout ``metrics.retrieval_metrics`` expects."""
    images: tuple[RetrievalImage, ...]
    language: str | None
    source: str

    @property
    def texts(self) -> list[str]:
        """All captions, image by image (text index order)."""
        return [c for image in self.images for c in image.captions]

    @property
    def image_paths(self) -> list[str]:
        return [image.image_path for image in self.images]

    @property
    def txt2img(self) -> np.ndarray:
        """(N_txt,) int64 image index of every text."""
        return np.repeat(np.arange(len(self.images), dtype=np.int64),
                         [len(image.captions) for image in self.images])

    @property
    def img2txt(self) -> list[np.ndarray]:
        """N_img int64 arrays: the text indices of every image."""
        ends = np.cumsum([len(image.captions) for image in self.images])
        return [np.arange(end - len(image.captions), end, dtype=np.int64)
                for end, image in zip(ends, self.images)]


@dataclasses.dataclass(frozen=True)
class NLIExample:
    """One XVNLI example: image, hypothesis, label id (contradiction 0, entailment 1, neutral 2)."""
    pair_id: str
    image_id: str
    image_path: str
    premise: str | None
    hypothesis: str
    label: int
    language: str | None


@dataclasses.dataclass(frozen=True)
class ImagePairExample:
    """One MaRVL/NLVR2 example: two images (left, right), a statement, label 1 = true, 0 = false."""
    example_id: str
    image_paths: tuple[str, str]
    sentence: str
    label: int
    language: str | None
    concept: str | None


@dataclasses.dataclass(frozen=True)
class VQAExample:
    """One GQA/xGQA question.

    ``answer``: the single gold answer used for accuracy (the highest-scored label of the list format),
    None when the file has none. ``answers``: the training targets; the reference weights each of them
    1/len(answers) whatever its score.
    """
    question_id: str
    image_id: str
    image_path: str
    question: str
    answer: str | None
    answers: tuple[str, ...]
    language: str | None


# --------------------------------------------------------------------------------------------------
# File access and field checks
# --------------------------------------------------------------------------------------------------
def _iter_jsonl(path: PathLike) -> Iterator[tuple[str, dict]]:
    """Yields ("line N", object) for every non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise AnnotationError(path, where, None, f"invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(record, dict):
                raise AnnotationError(path, where, None, f"expected a JSON object, got {type(record).__name__}")
            yield where, record


def _load_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise AnnotationError(path, f"line {e.lineno}", None, f"invalid JSON ({e.msg}, column {e.colno})") from None


def _get(record: dict, field: str, kind: type | tuple[type, ...], path: PathLike, where: str,
         required: bool = True) -> Any:
    if field not in record:
        if required:
            raise AnnotationError(path, where, field, f"missing (record has {sorted(record)})")
        return None
    value = record[field]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise AnnotationError(path, where, field, f"expected {names}, got {type(value).__name__} {value!r:.80}")
    return value


def _get_id(record: dict, field: str, path: PathLike, where: str) -> str:
    return str(_get(record, field, (str, int), path, where))


def _get_str_list(record: dict, field: str, path: PathLike, where: str) -> list[str]:
    value = _get(record, field, list, path, where)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise AnnotationError(path, where, field, f"item {i} must be a string, got {type(item).__name__}")
    return value


def _join(root: PathLike, relative: str) -> str:
    return os.path.join(os.fspath(root), relative)


def missing_images(paths: Sequence[str]) -> list[str]:
    """The paths (unique, in first-seen order) that are not existing files."""
    return [p for p in dict.fromkeys(paths) if not os.path.isfile(p)]


def _check_images(paths: Sequence[str], source: PathLike, check: bool) -> None:
    if not check:
        return
    missing = missing_images(paths)
    if missing:
        shown = "\n  ".join(missing[:_MISSING_SHOWN])
        raise FileNotFoundError(f"{len(missing)} of {len(set(paths))} images referenced by "
                                f"{os.fspath(source)} are missing, first:\n  {shown}")


def _file_language(records_language: set[str], language: str | None, path: PathLike) -> str | None:
    if language is not None:
        return language
    if len(records_language) > 1:
        raise AnnotationError(path, "all records", "language", f"mixes languages {sorted(records_language)}")
    return next(iter(records_language), None)


# --------------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------------
def _flickr_coco_path(image_root: ImageRoot, img_path: str, path: PathLike, where: str) -> str:
    if isinstance(image_root, Mapping):
        key = "coco" if "COCO" in img_path else "flickr30k"
        if key not in image_root:
            raise AnnotationError(path, where, "img_path",
                                  f"{img_path!r} needs image_root['{key}'] (config.data.image_root.{key}), which is "
                                  f"not set (set: {sorted(image_root)})")
        return _join(image_root[key], img_path)
    return _join(image_root, img_path)


def read_retrieval_jsonl(path: PathLike, image_root: ImageRoot, *, language: str | None = None,
                         check_images: bool = False) -> RetrievalSet:
    """IGLUE xFlickr&CO (test, few-shot ``train_N``, translate-test ``test_gmt``) and Flickr30K jsonl.

    Args:
      path: the ``.jsonl`` file.
      image_root: image folder, or ``{"flickr30k": dir, "coco": dir}`` for files mixing both.
      language: language code stored on the set (the files do not name it).
      check_images: raise ``FileNotFoundError`` if an image file is missing.
    """
    images, skipped = [], 0
    for where, record in _iter_jsonl(path):
        captions = _get_str_list(record, "sentences", path, where)
        image_id = _get_id(record, "id", path, where)
        img_path = _get(record, "img_path", str, path, where)
        if not any(captions):
            skipped += 1
            continue
        images.append(RetrievalImage(image_id, _flickr_coco_path(image_root, img_path, path, where),
                                     tuple(captions)))
    if skipped:
        log.info("%s: skipped %d images whose captions are all empty", os.fspath(path), skipped)
    result = RetrievalSet(tuple(images), language, os.fspath(path))
    _check_images(result.image_paths, path, check_images)
    return result


def wit_image_file(image_url: str) -> str:
    """File name under which a WIT image is stored: the percent-decoded last part of its URL path."""
    name = unquote(os.path.basename(urlparse(image_url).path))
    if not name:
        raise ValueError(f"WIT image URL {image_url!r} has no file name")
    return name


def read_wit_jsonl(path: PathLike, image_root: PathLike, *, language: str | None = None,
                   check_images: bool = False) -> RetrievalSet:
    """IGLUE WIT jsonl (``test_<lang>``, ``val_en``, translate-test ``test_<lang>_gmt``).

    Captions of the same ``image_url`` form one image (first-appearance order); empty captions are
    skipped. Images that carry ``image_content`` are not looked up on disk by ``check_images``.
    """
    groups: dict[str, list] = {}
    languages: set[str] = set()
    for where, record in _iter_jsonl(path):
        caption = _get(record, "caption_reference_description", str, path, where)
        url = _get(record, "image_url", str, path, where)
        lang = _get(record, "language", str, path, where, required=False)
        encoded = _get(record, "image_content", str, path, where, required=False)
        if lang:
            languages.add(lang)
        if not caption:
            continue
        try:
            file_name = wit_image_file(url)
        except ValueError as e:
            raise AnnotationError(path, where, "image_url", str(e)) from None
        entry = groups.setdefault(url, [file_name, [], encoded])
        entry[1].append(caption)
    images = tuple(RetrievalImage(url, _join(image_root, name), tuple(caps), encoded)
                   for url, (name, caps, encoded) in groups.items())
    result = RetrievalSet(images, _file_language(languages, language, path), os.fspath(path))
    _check_images([i.image_path for i in images if i.image_b64 is None], path, check_images)
    return result


def read_cclm_retrieval_json(path: PathLike, image_root: PathLike, *, language: str | None = None,
                             check_images: bool = False) -> RetrievalSet:
    """CCLM/X-VLM retrieval json (Multi30K ``test_2016_flickr.<lang>.json``, COCO ``*.1k_test``).

    A record with a caption list is one image (evaluation layout); records with a single caption string
    (training layout) are grouped by ``image`` in order of first appearance.
    """
    data = _load_json(path)
    if not isinstance(data, list):
        raise AnnotationError(path, "top level", None, f"expected a JSON list of records, got {type(data).__name__}")
    entries: list[list] = []
    by_image: dict[str, list] = {}
    for index, record in enumerate(data):
        where = f"record {index}"
        if not isinstance(record, dict):
            raise AnnotationError(path, where, None, f"expected a JSON object, got {type(record).__name__}")
        image = _get(record, "image", str, path, where)
        caption = _get(record, "caption", (str, list), path, where)
        if isinstance(caption, list):
            captions = _get_str_list(record, "caption", path, where)
            if not captions:
                raise AnnotationError(path, where, "caption", "empty caption list")
            entries.append([image, list(captions)])
        elif image in by_image:
            by_image[image][1].append(caption)
        else:
            by_image[image] = [image, [caption]]
            entries.append(by_image[image])
    images = tuple(RetrievalImage(image, _join(image_root, image), tuple(caps)) for image, caps in entries)
    result = RetrievalSet(images, language, os.fspath(path))
    _check_images(result.image_paths, path, check_images)
    return result


def read_flickr8k(path: PathLike, image_root: PathLike, language: str, *, field: str | None = None,
                  check_images: bool = False) -> RetrievalSet:
    """Retrieval set in one language from the Flickr8k jsonl of ``../shared/data/flickr8k``.

    Args:
      path: ``train.jsonl`` or ``val.jsonl``; ``image`` is relative to the flickr8k folder.
      image_root: the flickr8k folder.
      language: ``en, de, fr, cs`` (Multi30K) or ``zh`` (Flickr8k-CN).
      field: caption source. Default: ``multi30k_task1`` (1 human translation per image) for
        en/de/fr/cs, ``flickr8kcn_zh`` (5 captions) for zh. ``multi30k_task2`` (5 independent en/de
        descriptions) and ``flickr8k_en`` (5 en captions) are the alternatives.
    """
    if field is None:
        field = "flickr8kcn_zh" if language == "zh" else "multi30k_task1"
    if field not in FLICKR8K_FIELDS:
        raise ValueError(f"unknown Flickr8k caption field {field!r}; choose from {FLICKR8K_FIELDS}")
    single_language = {"flickr8k_en": "en", "flickr8kcn_zh": "zh"}
    if field in single_language and language != single_language[field]:
        raise ValueError(f"field {field!r} holds only '{single_language[field]}' captions, not {language!r}")
    images = []
    for where, record in _iter_jsonl(path):
        image = _get(record, "image", str, path, where)
        image_id = _get_id(record, "flickr_id", path, where)
        if field in single_language:
            captions = _get_str_list(record, field, path, where)
        else:
            per_language = _get(record, field, dict, path, where)
            if language not in per_language:
                raise AnnotationError(path, where, field, f"no {language!r} captions (has {sorted(per_language)})")
            captions = per_language[language]
            captions = [captions] if isinstance(captions, str) else captions
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise AnnotationError(path, where, f"{field}.{language}", "expected a string or a list of strings")
        if not captions:
            raise AnnotationError(path, where, field, "no caption")
        images.append(RetrievalImage(image_id, _join(image_root, image), tuple(captions)))
    result = RetrievalSet(tuple(images), language, os.fspath(path))
    _check_images(result.image_paths, path, check_images)
    return result


# --------------------------------------------------------------------------------------------------
# Classification: XVNLI, MaRVL / NLVR2
# --------------------------------------------------------------------------------------------------
def read_xvnli_jsonl(path: PathLike, image_root: PathLike, *, language: str | None = None,
                     check_images: bool = False) -> list[NLIExample]:
    """XVNLI jsonl (``train``, ``dev``, ``test``, few-shot ``train_N``, translate-test ``test``)."""
    examples, no_label = [], 0
    for where, record in _iter_jsonl(path):
        gold = _get(record, "gold_label", str, path, where)
        hypothesis = _get(record, "sentence2", str, path, where)
        image_id = _get_id(record, "Flikr30kID", path, where)
        premise = _get(record, "sentence1", str, path, where, required=False)
        pair_id = _get(record, "pairID", (str, int), path, where, required=False)
        if gold == XVNLI_NO_LABEL:
            no_label += 1
            continue
        if gold not in XVNLI_LABELS:
            raise AnnotationError(path, where, "gold_label", f"{gold!r} is not one of {sorted(XVNLI_LABELS)} or '-'")
        examples.append(NLIExample(str(pair_id) if pair_id is not None else where, image_id,
                                   _join(image_root, image_id + ".jpg"), premise, hypothesis,
                                   XVNLI_LABELS[gold], language))
    if no_label:
        log.info("%s: skipped %d pairs without a gold label ('-')", os.fspath(path), no_label)
    _check_images([e.image_path for e in examples], path, check_images)
    return examples


def _bool_label(value: Any, path: PathLike, where: str) -> int:
    if value is True or value == "True":
        return 1
    if value is False or value == "False":
        return 0
    raise AnnotationError(path, where, "label", f"expected true/false or \"True\"/\"False\", got {value!r}")


def read_marvl_jsonl(path: PathLike, image_root: PathLike, *, layout: str = "zero_shot",
                     check_images: bool = False) -> list[ImagePairExample]:
    """MaRVL jsonl (zero-shot ``marvl-<lang>``, translate-test ``marvl-<lang>_gmt``, few-shot ``_trainN``).

    Args:
      layout: how the images lie under ``image_root`` (the reference's layout):
        ``"zero_shot"``: ``<lang>/images/<concept>/<left_img>``;
        ``"few_shot"``: ``<lang>/all/<file name of left_img>``.
    """
    if layout not in MARVL_LAYOUTS:
        raise ValueError(f"unknown MaRVL image layout {layout!r}; choose from {MARVL_LAYOUTS}")
    examples = []
    for where, record in _iter_jsonl(path):
        caption = _get(record, "caption", str, path, where)
        sides = [_get(record, key, str, path, where) for key in ("left_img", "right_img")]
        lang = _get(record, "language", str, path, where)
        concept = _get(record, "concept", str, path, where)
        label = _bool_label(_get(record, "label", (bool, str), path, where), path, where)
        example_id = _get(record, "id", (str, int), path, where, required=False)
        if layout == "zero_shot":
            paths = tuple(_join(image_root, os.path.join(lang, "images", concept, s)) for s in sides)
        else:
            paths = tuple(_join(image_root, os.path.join(lang, "all", os.path.basename(s))) for s in sides)
        examples.append(ImagePairExample(str(example_id) if example_id is not None else where, paths,
                                         caption, label, lang, concept))
    _check_images([p for e in examples for p in e.image_paths], path, check_images)
    return examples


def read_nlvr_json(path: PathLike, image_root: PathLike, *, language: str | None = None,
                   check_images: bool = False) -> list[ImagePairExample]:
    """CCLM/ALBEF NLVR2 json: a list of ``{"images": [left, right], "sentence", "label"}``."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise AnnotationError(path, "top level", None, f"expected a JSON list of records, got {type(data).__name__}")
    examples = []
    for index, record in enumerate(data):
        where = f"record {index}"
        if not isinstance(record, dict):
            raise AnnotationError(path, where, None, f"expected a JSON object, got {type(record).__name__}")
        pair = _get_str_list(record, "images", path, where)
        if len(pair) != 2:
            raise AnnotationError(path, where, "images", f"expected 2 image paths, got {len(pair)}")
        sentence = _get(record, "sentence", str, path, where)
        label = _bool_label(_get(record, "label", (bool, str), path, where), path, where)
        examples.append(ImagePairExample(str(index), (_join(image_root, pair[0]), _join(image_root, pair[1])),
                                         sentence, label, language, None))
    _check_images([p for e in examples for p in e.image_paths], path, check_images)
    return examples


# --------------------------------------------------------------------------------------------------
# VQA: GQA / xGQA
# --------------------------------------------------------------------------------------------------
def _gqa_from_object(path: PathLike, question_id: str, record: Any, image_root: PathLike,
                     language: str | None) -> VQAExample:
    where = f"question '{question_id}'"
    if not isinstance(record, dict):
        raise AnnotationError(path, where, None, f"expected a JSON object, got {type(record).__name__}")
    image_id = _get_id(record, "imageId", path, where)
    question = _get(record, "question", str, path, where)
    answer = _get(record, "answer", str, path, where, required=False)
    return VQAExample(question_id, image_id, _join(image_root, image_id + ".jpg"), question, answer,
                      (answer,) if answer is not None else (), language)


def _gqa_from_list_item(path: PathLike, index: int, record: Any, image_root: PathLike,
                        language: str | None) -> VQAExample:
    where = f"record {index}"
    if not isinstance(record, dict):
        raise AnnotationError(path, where, None, f"expected a JSON object, got {type(record).__name__}")
    question_id = _get_id(record, "question_id", path, where)
    image_id = _get_id(record, "img_id", path, where)
    question = _get(record, "sent", str, path, where)
    label = _get(record, "label", dict, path, where, required=False) or {}
    for answer, score in label.items():
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise AnnotationError(path, where, f"label.{answer}", f"score must be a number, got {score!r}")
    gold = max(label, key=label.get) if label else None
    return VQAExample(question_id, image_id, _join(image_root, image_id + ".jpg"), question, gold,
                      tuple(label), language)


def read_gqa_json(path: PathLike, image_root: PathLike, *, language: str | None = None,
                  check_images: bool = False) -> list[VQAExample]:
    """GQA/xGQA questions from either json layout (see the module docstring), in file order."""
    data = _load_json(path)
    if isinstance(data, dict):
        examples = [_gqa_from_object(path, str(q), r, image_root, language) for q, r in data.items()]
    elif isinstance(data, list):
        examples = [_gqa_from_list_item(path, i, r, image_root, language) for i, r in enumerate(data)]
    else:
        raise AnnotationError(path, "top level", None,
                              f"expected a JSON object (question id -> question) or list, got {type(data).__name__}")
    _check_images([e.image_path for e in examples], path, check_images)
    return examples


def read_answer_list(path: PathLike) -> list[str]:
    """Candidate answers for VQA ranking: the keys of ``trainval_ans2label.json`` in file order."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(path, "top level", None,
                              f"expected a JSON object answer -> label id, got {type(data).__name__}")
    seen: dict[int, str] = {}
    for answer, label in data.items():
        if isinstance(label, bool) or not isinstance(label, int):
            raise AnnotationError(path, f"answer {answer!r}", answer, f"label id must be an int, got {label!r}")
        if label in seen:
            raise AnnotationError(path, f"answer {answer!r}", answer,
                                  f"label id {label} already used by {seen[label]!r}")
        seen[label] = answer
    if not data:
        raise AnnotationError(path, "top level", None, "empty answer list")
    return list(data)


# --------------------------------------------------------------------------------------------------
# IGLUE folder layout
# --------------------------------------------------------------------------------------------------
def iglue_annotation_path(iglue_root: PathLike, task: str, language: str, split: str = "test", *,
                          shots: str | int | None = None, translate_test: bool = False) -> str:
    """Path of an annotation file inside an IGLUE ``datasets/`` folder.

    Args:
      iglue_root: the IGLUE ``datasets`` folder (holds ``xFlickrCO``, ``wit``, ``XVNLI``, ``marvl``,
        ``xGQA``, ``gqa``, ``flickr30k``).
      task: ``xflickrco``, ``wit``, ``xvnli``, ``marvl`` or ``xgqa``.
      language: language code.
      split: ``test`` (all tasks); ``dev`` (xvnli, xgqa); ``train`` (xvnli en); ``valid`` (xflickrco en =
        Flickr30K valid; wit en = ``val_en``). Ignored when ``shots`` is given.
      shots: few-shot training file, e.g. ``10`` or ``"100x5"`` (xflickrco, xvnli, marvl, xgqa).
      translate_test: the machine-translated English test file (xflickrco, wit, xvnli, marvl).
    Returns:
      The path (not checked for existence).
    """
    root, task = os.fspath(iglue_root), task.lower()
    if translate_test and (shots is not None or split != "test"):
        raise ValueError(f"translate-test files exist only for split 'test', not split={split!r} shots={shots!r}")
    if task == "xflickrco":
        if translate_test:
            return os.path.join(root, "xFlickrCO", "annotations_machine-translate", language, "test_gmt.jsonl")
        if shots is not None:
            return os.path.join(root, "xFlickrCO", "annotations", language, f"train_{shots}.jsonl")
        if split == "valid":
            return os.path.join(root, "flickr30k", "annotations", "valid_ann.jsonl")
        if split == "test":
            return os.path.join(root, "xFlickrCO", "annotations", language, "test.jsonl")
    elif task == "wit":
        if translate_test:
            return os.path.join(root, "wit", "annotations_machine-translate", f"test_{language}_gmt.jsonl")
        if split == "test" and shots is None:
            return os.path.join(root, "wit", "annotations", f"test_{language}.jsonl")
        if split == "valid" and shots is None:
            return os.path.join(root, "wit", "annotations", f"val_{language}.jsonl")
    elif task == "xvnli":
        if translate_test:
            return os.path.join(root, "XVNLI", "annotations_machine-translate", language, "test.jsonl")
        if shots is not None:
            return os.path.join(root, "XVNLI", "annotations", language, f"train_{shots}.jsonl")
        if split in ("test", "dev", "train"):
            return os.path.join(root, "XVNLI", "annotations", language, f"{split}.jsonl")
    elif task == "marvl":
        if translate_test:
            return os.path.join(root, "marvl", "zero_shot", "annotations_machine-translate",
                                f"marvl-{language}_gmt.jsonl")
        if shots is not None:
            return os.path.join(root, "marvl", "few_shot", "annotations", f"marvl-{language}_train{shots}.jsonl")
        if split == "test":
            return os.path.join(root, "marvl", "zero_shot", "annotations", f"marvl-{language}.jsonl")
    elif task == "xgqa":
        if translate_test:
            raise ValueError("no translate-test layout is known for xGQA in IGLUE")
        if shots is not None:
            return os.path.join(root, "xGQA", "annotations", "few_shot", language, f"train_{shots}.json")
        if split in ("test", "dev"):
            return os.path.join(root, "xGQA", "annotations", "few_shot", language, f"{split}.json")
    else:
        raise ValueError(f"unknown IGLUE task {task!r}; choose from xflickrco, wit, xvnli, marvl, xgqa")
    raise ValueError(f"IGLUE task {task!r} has no split {split!r} (shots={shots!r})")


def read_iglue(iglue_root: PathLike, task: str, language: str, image_root: ImageRoot, split: str = "test", *,
               shots: str | int | None = None, translate_test: bool = False, check_images: bool = False):
    """Reads one IGLUE annotation file with the right reader (see ``iglue_annotation_path``).

    Returns a ``RetrievalSet`` (xflickrco, wit) or a list of ``NLIExample`` (xvnli),
    ``ImagePairExample`` (marvl; few-shot image layout when ``shots`` is given) or ``VQAExample`` (xgqa).
    """
    path = iglue_annotation_path(iglue_root, task, language, split, shots=shots, translate_test=translate_test)
    task = task.lower()
    if task == "xflickrco":
        return read_retrieval_jsonl(path, image_root, language=language, check_images=check_images)
    if task == "wit":
        return read_wit_jsonl(path, image_root, language=language, check_images=check_images)
    if task == "xvnli":
        return read_xvnli_jsonl(path, image_root, language=language, check_images=check_images)
    if task == "marvl":
        layout = "few_shot" if shots is not None else "zero_shot"
        return read_marvl_jsonl(path, image_root, layout=layout, check_images=check_images)
    return read_gqa_json(path, image_root, language=language, check_images=check_images)
