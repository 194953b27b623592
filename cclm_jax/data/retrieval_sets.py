"""Readers of the retrieval annotation files: IGLUE xFlickr&CO / Flickr30K jsonl, IGLUE WIT jsonl, CCLM retrieval json
(Multi30K, MSCOCO) and the Flickr8k jsonl of ``../shared/data/flickr8k``; each gives a ``RetrievalSet``.

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

Records, errors and image checks as `data.annotations` describes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from urllib.parse import unquote, urlparse

import numpy as np

from cclm_jax.data.annotations import (AnnotationError, ImageRoot, PathLike, file_language, get_field, get_id,
                                       get_str_list, iter_jsonl, join, load_json, require_images)

FLICKR8K_FIELDS = ("multi30k_task1", "multi30k_task2", "flickr8k_en", "flickr8kcn_zh")

log = logging.getLogger(__name__)


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
        return join(image_root[key], img_path)
    return join(image_root, img_path)


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
    for where, record in iter_jsonl(path):
        captions = get_str_list(record, "sentences", path, where)
        image_id = get_id(record, "id", path, where)
        img_path = get_field(record, "img_path", str, path, where)
        if not any(captions):
            skipped += 1
            continue
        images.append(RetrievalImage(image_id, _flickr_coco_path(image_root, img_path, path, where),
                                     tuple(captions)))
    if skipped:
        log.info("%s: skipped %d images whose captions are all empty", os.fspath(path), skipped)
    result = RetrievalSet(tuple(images), language, os.fspath(path))
    require_images(result.image_paths, path, check_images)
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
    for where, record in iter_jsonl(path):
        caption = get_field(record, "caption_reference_description", str, path, where)
        url = get_field(record, "image_url", str, path, where)
        lang = get_field(record, "language", str, path, where, required=False)
        encoded = get_field(record, "image_content", str, path, where, required=False)
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
    images = tuple(RetrievalImage(url, join(image_root, name), tuple(caps), encoded)
                   for url, (name, caps, encoded) in groups.items())
    result = RetrievalSet(images, file_language(languages, language, path), os.fspath(path))
    require_images([i.image_path for i in images if i.image_b64 is None], path, check_images)
    return result


def read_cclm_retrieval_json(path: PathLike, image_root: PathLike, *, language: str | None = None,
                             check_images: bool = False) -> RetrievalSet:
    """CCLM/X-VLM retrieval json (Multi30K ``test_2016_flickr.<lang>.json``, COCO ``*.1k_test``).

    A record with a caption list is one image (evaluation layout); records with a single caption string
    (training layout) are grouped by ``image`` in order of first appearance.
    """
    data = load_json(path)
    if not isinstance(data, list):
        raise AnnotationError(path, "top level", None, f"expected a JSON list of records, got {type(data).__name__}")
    entries: list[list] = []
    by_image: dict[str, list] = {}
    for index, record in enumerate(data):
        where = f"record {index}"
        if not isinstance(record, dict):
            raise AnnotationError(path, where, None, f"expected a JSON object, got {type(record).__name__}")
        image = get_field(record, "image", str, path, where)
        caption = get_field(record, "caption", (str, list), path, where)
        if isinstance(caption, list):
            captions = get_str_list(record, "caption", path, where)
            if not captions:
                raise AnnotationError(path, where, "caption", "empty caption list")
            entries.append([image, list(captions)])
        elif image in by_image:
            by_image[image][1].append(caption)
        else:
            by_image[image] = [image, [caption]]
            entries.append(by_image[image])
    images = tuple(RetrievalImage(image, join(image_root, image), tuple(caps)) for image, caps in entries)
    result = RetrievalSet(images, language, os.fspath(path))
    require_images(result.image_paths, path, check_images)
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
    for where, record in iter_jsonl(path):
        image = get_field(record, "image", str, path, where)
        image_id = get_id(record, "flickr_id", path, where)
        if field in single_language:
            captions = get_str_list(record, field, path, where)
        else:
            per_language = get_field(record, field, dict, path, where)
            if language not in per_language:
                raise AnnotationError(path, where, field, f"no {language!r} captions (has {sorted(per_language)})")
            captions = per_language[language]
            captions = [captions] if isinstance(captions, str) else captions
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise AnnotationError(path, where, f"{field}.{language}", "expected a string or a list of strings")
        if not captions:
            raise AnnotationError(path, where, field, "no caption")
        images.append(RetrievalImage(image_id, join(image_root, image), tuple(captions)))
    result = RetrievalSet(tuple(images), language, os.fspath(path))
    require_images(result.image_paths, path, check_images)
    return result
