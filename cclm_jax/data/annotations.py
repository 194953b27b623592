"""What the downstream annotation readers share (`data.retrieval_sets`, `data.iglue`): the error a malformed
record raises, JSON / JSON-lines access with field checks, and the image-file check.

Every reader returns plain Python records (frozen dataclasses) whose image paths are joined onto an image
root given by the caller; no image is opened. With ``check_images=True`` a reader raises
``FileNotFoundError`` naming the missing image files (count and the first few paths). A malformed record
raises ``AnnotationError`` (a ``ValueError``) naming the file, the line (or record) and the field.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

PathLike = str | os.PathLike
ImageRoot = PathLike | Mapping[str, PathLike]

_MISSING_SHOWN = 5


class AnnotationError(ValueError):
    """A malformed annotation record: ``path``, ``where`` (e.g. "line 3") and ``field`` say which."""

    def __init__(self, path: PathLike, where: str, field: str | None, problem: str):
        self.path, self.where, self.field = os.fspath(path), where, field
        what = f", field '{field}'" if field else ""
        super().__init__(f"{self.path}, {where}{what}: {problem}")


# --------------------------------------------------------------------------------------------------
# File access and field checks
# --------------------------------------------------------------------------------------------------
def iter_jsonl(path: PathLike) -> Iterator[tuple[str, dict]]:
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


def load_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise AnnotationError(path, f"line {e.lineno}", None, f"invalid JSON ({e.msg}, column {e.colno})") from None


def get_field(record: dict, field: str, kind: type | tuple[type, ...], path: PathLike, where: str,
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


def get_id(record: dict, field: str, path: PathLike, where: str) -> str:
    return str(get_field(record, field, (str, int), path, where))


def get_str_list(record: dict, field: str, path: PathLike, where: str) -> list[str]:
    value = get_field(record, field, list, path, where)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise AnnotationError(path, where, field, f"item {i} must be a string, got {type(item).__name__}")
    return value


def join(root: PathLike, relative: str) -> str:
    return os.path.join(os.fspath(root), relative)


def missing_images(paths: Sequence[str]) -> list[str]:
    """The paths (unique, in first-seen order) that are not existing files."""
    return [p for p in dict.fromkeys(paths) if not os.path.isfile(p)]


def require_images(paths: Sequence[str], source: PathLike, check: bool, names: str = "") -> None:
    """With `check`, FileNotFoundError listing the first missing image files; `names` says how the file names
    are formed (appended to the message)."""
    if not check:
        return
    missing = missing_images(paths)
    if missing:
        shown = "\n  ".join(missing[:_MISSING_SHOWN])
        raise FileNotFoundError(f"{len(missing)} of {len(set(paths))} images referenced by "
                                f"{os.fspath(source)} are missing{f' ({names})' if names else ''}, first:\n  {shown}")


def file_language(records_language: set[str], language: str | None, path: PathLike) -> str | None:
    if language is not None:
        return language
    if len(records_language) > 1:
        raise AnnotationError(path, "all records", "language", f"mixes languages {sorted(records_language)}")
    return next(iter(records_language), None)
