"""What a fine-tuning run trains and tests on: the task's annotation files, located from `config.data` and
`config.protocol` and read with the readers of `data.iglue` and `data.retrieval_sets`, every file and image
checked before anything compiles (a missing one is an error naming its path and the config field that leads to
it).

Sources, chosen by the fields a config's `data` section has:
- IGLUE (`data.iglue_task`, `data.iglue_root` = the IGLUE `datasets/` folder, `data.image_root`):
  xflickrco / wit: train on `iglue_root/data.train_file` (Flickr30K / WIT English); xvnli: `XVNLI/annotations/
  <lang>/train.jsonl`; marvl: the NLVR2 json lists `data.train_files` (images under `data.nlvr_image_root`);
  xgqa: `iglue_root/data.train_file` (GQA) and the answer list `iglue_root/data.answer_list`. Tests: the
  IGLUE test file of every language in `data.languages`.
- CCLM retrieval json (`data.test_files` = {language: file}): Multi30K, MSCOCO; train on `data.train_files`.
- Flickr8k (`data.flickr8k_root`, the folder of `../shared/data/flickr8k`): train on `train.jsonl`, test on
  `val.jsonl`, captions of `data.languages`.

Test files may live elsewhere than the training data: `data.test_root` (default: the training root) is read
instead of `data.iglue_root` / `data.flickr8k_root` for the test annotation files (same layout inside; Flickr8k's
images too), and relative `data.test_files` entries are resolved against it.

Missing images: by default any missing image file is an error naming the file that refers to it (and how image
names are formed). `data.skip_missing_images=True` (partial downloads) instead drops every training or test
record whose image file is missing and counts them (`TaskData.skipped`, `{"train" or "test/<lang>":
count}`); the run prints the counts at its start and writes them to its metrics
(`data/<split>/skipped_missing_image`).

Protocols (`tasks.apply_protocol`): zero_shot trains on `data.train_language` (IGLUE: English) and tests every
language; translate_test tests the IGLUE machine-translated English files (English keeps its own test);
few_shot trains on the IGLUE few-shot file `data.shots` of `data.train_language` and tests that language;
all_languages trains on every language of `data.languages` (xvnli, Flickr8k; Multi30K/MSCOCO take the files
listed in `data.train_files`).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from cclm_jax.data import iglue, retrieval_sets
from cclm_jax.data.annotations import missing_images
from cclm_jax.data.retrieval_sets import RetrievalImage, RetrievalSet

SOURCES = ("iglue", "cclm_json", "flickr8k")
FLICKR8K_SPLITS = {"train": "train.jsonl", "test": "val.jsonl"}


@dataclasses.dataclass(frozen=True)
class RetrievalPair:
    """One retrieval training row: an image, one of its captions, and the image's index in the training set
    (rows with the same index are positives of each other in ITC and never ITM negatives)."""

    image: RetrievalImage
    caption: str
    image_index: int


@dataclasses.dataclass(frozen=True)
class TaskData:
    """train: training rows (`RetrievalPair`, `iglue.NLIExample`, `ImagePairExample` or `VQAExample`; empty
    when not read); tests: language -> `RetrievalSet` (retrieval) or list of examples; answers: xGQA candidates;
    skipped: records dropped for a missing image ("train" / "test/<lang>" -> count; `data.skip_missing_images`)."""

    train: tuple
    tests: dict[str, Any]
    answers: tuple[str, ...] = ()
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """`data/<split>/skipped_missing_image` counters (the run's metrics and its start line)."""
        return {f"data/{split}/skipped_missing_image": float(n) for split, n in sorted(self.skipped.items())}


def data_source(data: ml_collections.ConfigDict) -> str:
    """'iglue', 'cclm_json' or 'flickr8k', from the fields `data` has (see the module docstring)."""
    if "iglue_task" in data:
        return "iglue"
    if "flickr8k_root" in data:
        return "flickr8k"
    if "test_files" in data:
        return "cclm_json"
    raise ValueError("config.data names no fine-tuning data: expected iglue_task + iglue_root (IGLUE), "
                     "test_files (CCLM retrieval json) or flickr8k_root")


def report_name(config: ml_collections.ConfigDict) -> str:
    """The task's name in results tables: `config.name`, with the protocol appended unless zero-shot, and `_itc`
    for retrieval scored by the dual encoder alone (`eval.rerank=False`)."""
    name = config.name if config.protocol == "zero_shot" else f"{config.name}_{config.protocol}"
    return f"{name}_itc" if config.task == "retrieval" and not config.eval.get("rerank", True) else name


def test_languages(config: ml_collections.ConfigDict) -> list[str]:
    """Languages evaluated: `data.languages`, or only `data.train_language` in the few-shot protocol."""
    if config.protocol == "few_shot":
        return [config.data.train_language]
    languages = list(config.data.languages)
    if not languages:
        raise ValueError("config.data.languages is empty: name the languages to evaluate")
    return languages


def _check_images(data: ml_collections.ConfigDict) -> bool:
    """Readers raise on a missing image unless `data.skip_missing_images` (then `_drop_missing` counts them)."""
    return not data.get("skip_missing_images", False)


def _test_root(data: ml_collections.ConfigDict, train_root_field: str) -> tuple[str, str]:
    """(folder of the test annotation files, the config field it comes from): `data.test_root` when set."""
    if data.get("test_root"):
        return data.test_root, "test_root"
    return data[train_root_field], train_root_field


def _require_file(path: str, field: str) -> str:
    if not path:
        raise ValueError(f"config.data.{field} is not set")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} (from config.data.{field}) does not exist")
    return path


def _require_dir(path: str, field: str) -> str:
    if not path:
        raise ValueError(f"config.data.{field} is not set")
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"config.data.{field}: directory {path} does not exist")
    return path


def _image_root(data: ml_collections.ConfigDict, field: str = "image_root"):
    """The image folder, or for a mapping ({"flickr30k": dir, "coco": dir}) the folders that are set: an empty
    entry is left out, and only a file that refers to its images fails (the reader names the file and key)."""
    root = data[field]
    if isinstance(root, ml_collections.ConfigDict):
        return {key: _require_dir(value, f"{field}.{key}") for key, value in root.items() if value}
    return _require_dir(root, field)


# ------------------------------------------------------------------------------------------------ IGLUE

def _iglue_file(config, language: str, split: str = "test", *, shots=None, translate_test=False,
                root_field: str = "iglue_root") -> str:
    data = config.data
    path = iglue.iglue_annotation_path(os.path.expanduser(data[root_field]), data.iglue_task, language, split,
                                       shots=shots, translate_test=translate_test)
    if not os.path.isfile(path):
        what = (f"the {data.iglue_task} {'translate-test' if translate_test else split} file of language "
                f"{language!r}" + (f" with {shots} shots" if shots is not None else ""))
        raise FileNotFoundError(f"{path} does not exist: {what} under config.data.{root_field} "
                                f"({data[root_field]!r}; languages from config.data.languages / train_language)")
    return path


def _read_iglue(config, language: str, split: str = "test", *, shots=None, translate_test=False,
                root_field: str = "iglue_root"):
    data = config.data
    _iglue_file(config, language, split, shots=shots, translate_test=translate_test, root_field=root_field)
    return iglue.read_iglue(os.path.expanduser(data[root_field]), data.iglue_task, language, _image_root(data),
                            split, shots=shots, translate_test=translate_test, check_images=_check_images(data))


def _iglue_train(config) -> list:
    data, task, protocol = config.data, config.data.iglue_task, config.protocol
    _require_dir(data.iglue_root, "iglue_root")
    if protocol == "few_shot":
        return _as_rows(config, [_read_iglue(config, data.train_language, shots=data.shots)])
    if protocol == "all_languages":
        if task != "xvnli":
            raise ValueError(f"protocol 'all_languages': IGLUE has no training data in other languages for "
                             f"{task}; use zero_shot, translate_test or few_shot")
        return _as_rows(config, [_read_iglue(config, lang, "train") for lang in data.languages])
    if task == "xvnli":
        return _as_rows(config, [_read_iglue(config, data.train_language, "train")])
    if task == "marvl":
        if not data.train_files:
            raise ValueError("config.data.train_files is empty: MaRVL trains on NLVR2 json lists (images under "
                             "config.data.nlvr_image_root)")
        root = _require_dir(data.nlvr_image_root, "nlvr_image_root")
        return [e for i, path in enumerate(data.train_files)
                for e in iglue.read_nlvr_json(_require_file(path, f"train_files[{i}]"), root,
                                              check_images=_check_images(data))]
    path = _require_file(os.path.join(os.path.expanduser(data.iglue_root), data.train_file), "train_file")
    if task == "xgqa":
        return iglue.read_gqa_json(path, _image_root(data), check_images=_check_images(data))
    reader = retrieval_sets.read_wit_jsonl if task == "wit" else retrieval_sets.read_retrieval_jsonl
    return _as_rows(config, [reader(path, _image_root(data), language=data.train_language,
                                    check_images=_check_images(data))])


def _iglue_tests(config) -> dict[str, Any]:
    translate = config.protocol == "translate_test"
    _, root_field = _test_root(config.data, "iglue_root")
    return {lang: _read_iglue(config, lang, translate_test=translate and lang != "en", root_field=root_field)
            for lang in test_languages(config)}


# ------------------------------------------------------------------------------------------------ others

def _cclm_json(config, train: bool) -> tuple[list, dict[str, Any]]:
    data = config.data
    root = _image_root(data)
    rows = []
    if train:
        if not data.train_files:
            raise ValueError("config.data.train_files is empty: list the CCLM retrieval json training files")
        rows = _as_rows(config, [retrieval_sets.read_cclm_retrieval_json(
            _require_file(path, f"train_files[{i}]"), root, check_images=_check_images(data))
            for i, path in enumerate(data.train_files)])
    tests = {}
    for lang in test_languages(config):
        if lang not in data.test_files:
            raise ValueError(f"config.data.test_files has no entry for language {lang!r} "
                             f"(has {sorted(data.test_files)})")
        path = os.path.join(os.path.expanduser(data.get("test_root") or ""), os.path.expanduser(data.test_files[lang]))
        path = _require_file(path, f"test_files.{lang}")
        tests[lang] = retrieval_sets.read_cclm_retrieval_json(path, root, language=lang,
                                                              check_images=_check_images(data))
    return rows, tests


def _flickr8k(config, train: bool) -> tuple[list, dict[str, Any]]:
    data = config.data
    roots = {"train": ("flickr8k_root", _require_dir(data.flickr8k_root, "flickr8k_root"))}
    test_field = _test_root(data, "flickr8k_root")[1]
    roots["test"] = (test_field, _require_dir(data[test_field], test_field))

    def read(split: str, lang: str) -> RetrievalSet:
        field, root = roots[split]
        path = _require_file(os.path.join(root, FLICKR8K_SPLITS[split]), field)
        return retrieval_sets.read_flickr8k(path, root, lang, check_images=_check_images(data))

    rows = []
    if train:
        languages = list(data.languages) if config.protocol == "all_languages" else [data.train_language]
        rows = _as_rows(config, [read("train", lang) for lang in languages])
    return rows, {lang: read("test", lang) for lang in test_languages(config)}


def _as_rows(config, parts: Sequence) -> list:
    """Training rows of several read files: retrieval sets become (image, caption, image index) pairs, the
    same image (by file, or by id when embedded) keeping one index across files; example lists are joined."""
    if config.task != "retrieval":
        return [example for part in parts for example in part]
    index: dict[str, int] = {}
    rows = []
    for part in parts:
        for image in part.images:
            key = image.image_id if image.image_b64 is not None else image.image_path
            i = index.setdefault(key, len(index))
            rows.extend(RetrievalPair(image, caption, i) for caption in image.captions if caption)
    return rows


def _image_files(record) -> list[str]:
    """The image files a record needs (none for an image embedded in the annotation)."""
    if isinstance(record, RetrievalPair):
        record = record.image
    if isinstance(record, RetrievalImage):
        return [] if record.image_b64 is not None else [record.image_path]
    return list(getattr(record, "image_paths", None) or [record.image_path])


def _drop_missing(records: Sequence) -> tuple[list, int]:
    """(the records whose image files all exist, how many were dropped)."""
    missing = set(missing_images([p for r in records for p in _image_files(r)]))
    kept = [r for r in records if not missing.intersection(_image_files(r))]
    return kept, len(records) - len(kept)


def _drop_missing_test(test):
    if isinstance(test, RetrievalSet):
        kept, dropped = _drop_missing(test.images)
        return dataclasses.replace(test, images=tuple(kept)), dropped
    return _drop_missing(test)


def load_task_data(config: ml_collections.ConfigDict, *, train: bool = True) -> TaskData:
    """Read (and check) the training rows (when `train`) and every test set of a fine-tuning config; with
    `data.skip_missing_images`, records with a missing image are dropped and counted (module docstring)."""
    source = data_source(config.data)
    answers: tuple[str, ...] = ()
    if source == "iglue":
        rows = _iglue_train(config) if train else []
        tests = _iglue_tests(config)
        if config.task == "xgqa":
            path = os.path.join(os.path.expanduser(config.data.iglue_root), config.data.answer_list)
            answers = tuple(iglue.read_answer_list(_require_file(path, "answer_list")))
    elif source == "cclm_json":
        rows, tests = _cclm_json(config, train)
    else:
        rows, tests = _flickr8k(config, train)
    skipped: dict[str, int] = {}
    if not _check_images(config.data):
        rows, skipped["train"] = _drop_missing(rows)
        for lang in list(tests):
            tests[lang], skipped[f"test/{lang}"] = _drop_missing_test(tests[lang])
        skipped = {k: n for k, n in skipped.items() if n}
    if train and not rows:
        raise ValueError(f"no training examples for {report_name(config)} (check the annotation files)")
    for lang, test in tests.items():
        count = len(test.images) if isinstance(test, RetrievalSet) else len(test)
        if count == 0:
            raise ValueError(f"the {lang!r} test set of {report_name(config)} is empty")
    return TaskData(tuple(rows), tests, answers, skipped)
