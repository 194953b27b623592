"""Readers of the IGLUE classification and VQA annotation files (XVNLI, MaRVL / NLVR2, GQA / xGQA), the IGLUE
``datasets/`` folder layout, and ``read_iglue`` (any IGLUE task's file, retrieval ones through
`data.retrieval_sets`).

Formats (field names exactly as in the files):
- XVNLI jsonl: ``Flikr30kID`` (image ``<id>.jpg``, see "Image names"), ``sentence1`` (premise, optional), ``sentence2``
  (hypothesis), ``gold_label`` -> {contradiction: 0, entailment: 1, neutral: 2}; SNLI's no-consensus
  label ``"-"`` is skipped (the reference skips it), any other label is an error.
- MaRVL jsonl (``left_img``, ``right_img``, ``caption``, ``label`` bool, ``concept``, ``language``) and the
  CCLM/NLVR2 json list (``images`` [2], ``sentence``, ``label`` bool or "True"/"False").
- GQA/xGQA json: either a JSON object question id -> ``{imageId, question, answer?}`` (xGQA test, dev and
  few-shot files) or a JSON list of ``{question_id, img_id, sent, label: {answer: score}}`` (GQA train).
  Images are ``image_root/<image id>.jpg`` (see "Image names"). The answer list is the key order of
  ``trainval_ans2label.json``.

Image names: where a file gives only an image id (XVNLI, GQA/xGQA), the image is ``<id>.jpg`` under the image
root, else ``<id>.jpeg``, ``<id>.png`` or the first (sorted) ``<id>_<suffix>.jpg`` there (`IdImages`; the folder is
listed once, only when some ``<id>.jpg`` is absent); a missing image's path is the ``<id>.jpg`` one.

Records, errors and image checks as `data.annotations` describes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from cclm_jax.data.annotations import (
    AnnotationError,
    ImageRoot,
    PathLike,
    get_field,
    get_id,
    get_str_list,
    iter_jsonl,
    join,
    load_json,
    require_images,
)
from cclm_jax.data.retrieval_sets import read_retrieval_jsonl, read_wit_jsonl

XVNLI_LABELS = {"contradiction": 0, "entailment": 1, "neutral": 2}
XVNLI_NO_LABEL = "-"
MARVL_LAYOUTS = ("zero_shot", "few_shot")

ID_IMAGE_NAMES = "looked up as <image root>/<id>.jpg, <id>.jpeg, <id>.png or <id>_<suffix>.jpg"

log = logging.getLogger(__name__)


class IdImages:
    """The file of an image named only by its id under `root` (module docstring, "Image names")."""

    def __init__(self, root: PathLike):
        self.root = os.fspath(root)
        self._names: set[str] | None = None
        self._suffixed: dict[str, str] = {}

    def _list(self) -> set[str]:
        if self._names is None:
            self._names = set(os.listdir(self.root)) if os.path.isdir(self.root) else set()
            for name in sorted(self._names, reverse=True):  # the first in sorted order wins
                stem, sep, _ = name.partition("_")
                if sep and name.endswith(".jpg"):
                    self._suffixed[stem] = name
        return self._names

    def path(self, image_id: str) -> str:
        default = join(self.root, image_id + ".jpg")
        if os.path.isfile(default):
            return default
        names = self._list()
        for name in (image_id + ".jpeg", image_id + ".png", self._suffixed.get(image_id)):
            if name and name in names:
                return join(self.root, name)
        return default


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------
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
# Classification: XVNLI, MaRVL / NLVR2
# --------------------------------------------------------------------------------------------------
def read_xvnli_jsonl(path: PathLike, image_root: PathLike, *, language: str | None = None,
                     check_images: bool = False) -> list[NLIExample]:
    """XVNLI jsonl (``train``, ``dev``, ``test``, few-shot ``train_N``, translate-test ``test``)."""
    examples, no_label = [], 0
    images = IdImages(image_root)
    for where, record in iter_jsonl(path):
        gold = get_field(record, "gold_label", str, path, where)
        hypothesis = get_field(record, "sentence2", str, path, where)
        image_id = get_id(record, "Flikr30kID", path, where)
        premise = get_field(record, "sentence1", str, path, where, required=False)
        pair_id = get_field(record, "pairID", (str, int), path, where, required=False)
        if gold == XVNLI_NO_LABEL:
            no_label += 1
            continue
        if gold not in XVNLI_LABELS:
            raise AnnotationError(path, where, "gold_label", f"{gold!r} is not one of {sorted(XVNLI_LABELS)} or '-'")
        examples.append(NLIExample(str(pair_id) if pair_id is not None else where, image_id,
                                   images.path(image_id), premise, hypothesis, XVNLI_LABELS[gold], language))
    if no_label:
        log.info("%s: skipped %d pairs without a gold label ('-')", os.fspath(path), no_label)
    require_images([e.image_path for e in examples], path, check_images, ID_IMAGE_NAMES)
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
    for where, record in iter_jsonl(path):
        caption = get_field(record, "caption", str, path, where)
        sides = [get_field(record, key, str, path, where) for key in ("left_img", "right_img")]
        lang = get_field(record, "language", str, path, where)
        concept = get_field(record, "concept", str, path, where)
        label = _bool_label(get_field(record, "label", (bool, str), path, where), path, where)
        example_id = get_field(record, "id", (str, int), path, where, required=False)
        if layout == "zero_shot":
            paths = tuple(join(image_root, os.path.join(lang, "images", concept, s)) for s in sides)
        else:
            paths = tuple(join(image_root, os.path.join(lang, "all", os.path.basename(s))) for s in sides)
        examples.append(ImagePairExample(str(example_id) if example_id is not None else where, paths,
                                         caption, label, lang, concept))
    require_images([p for e in examples for p in e.image_paths], path, check_images)
    return examples


def read_nlvr_json(path: PathLike, image_root: PathLike, *, language: str | None = None,
                   check_images: bool = False) -> list[ImagePairExample]:
    """CCLM/ALBEF NLVR2 json: a list of ``{"images": [left, right], "sentence", "label"}``."""
    data = load_json(path)
    if not isinstance(data, list):
        raise AnnotationError(path, "top level", None, f"expected a JSON list of records, got {type(data).__name__}")
    examples = []
    for index, record in enumerate(data):
        where = f"record {index}"
        if not isinstance(record, dict):
            raise AnnotationError(path, where, None, f"expected a JSON object, got {type(record).__name__}")
        pair = get_str_list(record, "images", path, where)
        if len(pair) != 2:
            raise AnnotationError(path, where, "images", f"expected 2 image paths, got {len(pair)}")
        sentence = get_field(record, "sentence", str, path, where)
        label = _bool_label(get_field(record, "label", (bool, str), path, where), path, where)
        examples.append(ImagePairExample(str(index), (join(image_root, pair[0]), join(image_root, pair[1])),
                                         sentence, label, language, None))
    require_images([p for e in examples for p in e.image_paths], path, check_images)
    return examples


# --------------------------------------------------------------------------------------------------
# VQA: GQA / xGQA
# --------------------------------------------------------------------------------------------------
def _gqa_from_object(path: PathLike, question_id: str, record: Any, images: IdImages,
                     language: str | None) -> VQAExample:
    where = f"question '{question_id}'"
    if not isinstance(record, dict):
        raise AnnotationError(path, where, None, f"expected a JSON object, got {type(record).__name__}")
    image_id = get_id(record, "imageId", path, where)
    question = get_field(record, "question", str, path, where)
    answer = get_field(record, "answer", str, path, where, required=False)
    return VQAExample(question_id, image_id, images.path(image_id), question, answer,
                      (answer,) if answer is not None else (), language)


def _gqa_from_list_item(path: PathLike, index: int, record: Any, images: IdImages,
                        language: str | None) -> VQAExample:
    where = f"record {index}"
    if not isinstance(record, dict):
        raise AnnotationError(path, where, None, f"expected a JSON object, got {type(record).__name__}")
    question_id = get_id(record, "question_id", path, where)
    image_id = get_id(record, "img_id", path, where)
    question = get_field(record, "sent", str, path, where)
    label = get_field(record, "label", dict, path, where, required=False) or {}
    for answer, score in label.items():
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise AnnotationError(path, where, f"label.{answer}", f"score must be a number, got {score!r}")
    gold = max(label, key=label.get) if label else None
    return VQAExample(question_id, image_id, images.path(image_id), question, gold, tuple(label), language)


def read_gqa_json(path: PathLike, image_root: PathLike, *, language: str | None = None,
                  check_images: bool = False) -> list[VQAExample]:
    """GQA/xGQA questions from either json layout (see the module docstring), in file order."""
    data = load_json(path)
    images = IdImages(image_root)
    if isinstance(data, dict):
        examples = [_gqa_from_object(path, str(q), r, images, language) for q, r in data.items()]
    elif isinstance(data, list):
        examples = [_gqa_from_list_item(path, i, r, images, language) for i, r in enumerate(data)]
    else:
        raise AnnotationError(path, "top level", None,
                              f"expected a JSON object (question id -> question) or list, got {type(data).__name__}")
    require_images([e.image_path for e in examples], path, check_images, ID_IMAGE_NAMES)
    return examples


def read_answer_list(path: PathLike) -> list[str]:
    """Candidate answers for VQA ranking: the keys of ``trainval_ans2label.json`` in file order."""
    data = load_json(path)
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
