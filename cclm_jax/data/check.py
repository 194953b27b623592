"""``cclm-jax data check``: read each configured source before a run and report what is in it.

``check_config(cfg, sample)`` reads up to ``sample`` usable examples (0 = all) of every section a
training run reads (``prepare.sections``): input files through the same readers the builders use
(nothing is built), prepared and catalog datasets through their TFDS files. Per section it
reports the examples read, captions per language (parallel text: sentences per language),
caption / sentence length in words (after cleaning) and in tokenizer ids (with <s> and </s>), the share over
``max_tokens``, the image size distribution (width x height from the image header), and the
skipped records by reason with their first locations.

Problems (``SectionReport.problems``, one line each): an invalid config or a missing file, a
source that cannot be read, a section without any usable example, and every skip reason that
means broken input. Filters are statistics, not problems: WikiMatrix pairs under the score
threshold (``below_min_score``), img2dataset rows that were never downloaded
(``failed_download``), and single empty captions of a record that has others (``empty_caption``).
"""
import collections
import dataclasses
import io
import itertools

import numpy as np
from PIL import Image

from cclm_jax.data import builders, pipeline, prepare, sources
from cclm_jax.data.config import validate_data_config
from cclm_jax.data.text import pre_caption

FILTER_REASONS = frozenset({"below_min_score", "failed_download", "empty_caption"})
FIRST_LOCATIONS = 3


class LocatingCounter(sources.SkipCounter):
    """A ``SkipCounter`` that also keeps the first ``FIRST_LOCATIONS`` locations of each reason."""

    def __init__(self):
        super().__init__()
        self.first: dict[str, list[str]] = collections.defaultdict(list)

    def skip(self, reason: str, where: str, detail: str = ""):
        self.counts[reason] += 1
        if len(self.first[reason]) < FIRST_LOCATIONS:
            self.first[reason].append(f"{where} ({detail})" if detail else where)


@dataclasses.dataclass
class SectionReport:
    """What ``check_config`` found in one section; ``lines()`` prints it."""

    section: str
    source: str
    examples: int = 0
    languages: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    words: list = dataclasses.field(default_factory=list)
    tokens: list = dataclasses.field(default_factory=list)
    max_tokens: int = 0
    sizes: list = dataclasses.field(default_factory=list)
    skipped: dict = dataclasses.field(default_factory=dict)
    first: dict = dataclasses.field(default_factory=dict)
    problems: list = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.section} ({self.source}): {self.examples} examples read, "
               f"{sum(self.skipped.values())} records skipped"]
        if self.languages:
            out.append("  languages: " + ", ".join(f"{k} {n}" for k, n in sorted(self.languages.items())))
        if self.words:
            out.append(f"  words: {_spread(self.words)}")
        if self.tokens:
            over = float(np.mean(np.asarray(self.tokens) > self.max_tokens))
            out.append(f"  tokens: {_spread(self.tokens)}; over max_tokens={self.max_tokens}: {over:.1%}")
        if self.sizes:
            widths, heights = zip(*self.sizes)
            out.append(f"  image width: {_spread(widths)}; height: {_spread(heights)}")
        for reason, n in sorted(self.skipped.items()):
            where = "; ".join(self.first.get(reason, []))
            out.append(f"  skipped {reason}: {n}" + (f" (first: {where})" if where else ""))
        return out


def _spread(values) -> str:
    v = np.asarray(values, np.float64)
    return (f"min {v.min():.0f} / p50 {np.percentile(v, 50):.0f} / mean {v.mean():.1f} / "
            f"p95 {np.percentile(v, 95):.0f} / max {v.max():.0f}")


def _image_size(data: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, ValueError):
        return None


def _texts(example: dict) -> list[tuple[str, str]]:
    """(language, text) of every caption / sentence of a canonical example."""
    if "captions" in example:
        return list(zip(example["languages"], example["captions"]))
    return [(example["lang_1"], example["text_1"]), (example["lang_2"], example["text_2"])]


def _as_python(example: dict) -> dict:
    """A canonical example from tf.data (bytes, arrays of bytes) as Python strings and bytes."""
    out = {}
    for key, value in example.items():
        value = value.numpy() if hasattr(value, "numpy") else value
        if key == "image":
            out[key] = bytes(value)
        elif isinstance(value, np.ndarray):
            out[key] = [v.decode("utf-8") for v in value.tolist()]
        else:
            out[key] = value.decode("utf-8") if isinstance(value, bytes) else value
    return out


def _examples(cfg, section: str, report: SectionReport, counter: LocatingCounter):
    """Canonical examples of ``section``: read from its input files, or from its TFDS dataset."""
    recipe = prepare.section_recipe(cfg, section)
    if recipe is not None:
        report.source = f"{cfg[section].kind}: {len(recipe.paths())} file(s)"
        entries = [e for split in recipe.splits.values() for e in split]
        for entry in entries:
            for _, example in builders.entry_examples(recipe, entry, counter):
                yield example
        return
    reader = cfg[section]
    source, split = (pipeline.open_parallel_text(cfg) if section == "parallel_text"
                     else pipeline.open_image_caption(cfg, section))
    report.source = f"tfds: {reader.tfds_name} ({split}, {source.num_examples(split)} examples)"
    report.skipped = dict(source.skipped)
    for example in source.read(split):
        yield _as_python(example)


def check_section(cfg, section: str, sample: int, tokenizer) -> SectionReport:
    """Read ``sample`` examples (0 = all) of one section and collect its statistics and problems."""
    reader = cfg[section]
    report = SectionReport(section, reader.kind, max_tokens=reader.max_tokens)
    counter = LocatingCounter()
    unreadable = False
    try:
        examples = _examples(cfg, section, report, counter)
        for example in itertools.islice(examples, sample or None):
            report.examples += 1
            for lang, text in _texts(example):
                report.languages[lang] += 1
                try:
                    cleaned = pre_caption(text, reader.max_words)
                except ValueError:
                    continue
                report.words.append(len(cleaned.split()))
                if tokenizer is not None:
                    report.tokens.append(len(tokenizer.encode_batch([cleaned])[0]) + 2)  # with <s> </s>
            if "image" in example:
                size = _image_size(example["image"])
                if size is not None:
                    report.sizes.append(size)
    except (ValueError, KeyError, OSError) as e:
        unreadable = True
        report.problems.append(f"{section}: cannot read the source: {error_line(e)}")
    if counter.counts:
        report.skipped = dict(counter.counts)
        report.first = dict(counter.first)
    for reason, n in sorted(report.skipped.items()):
        if reason not in FILTER_REASONS:
            where = ", ".join(report.first.get(reason, [])) or "counted when the dataset was prepared"
            report.problems.append(f"{section}: {n} record(s) skipped as {reason}; first: {where}")
    if report.examples == 0 and not unreadable:
        report.problems.append(f"{section}: no usable example in {report.source}")
    return report


def error_line(error: BaseException) -> str:
    """One line for an exception from a reader."""
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else (str(error) or type(error).__name__)


def check_config(cfg, sample: int = 1000) -> tuple[list[SectionReport], list[str]]:
    """(per-section reports, problem lines) of ``cfg`` (``config.data``); see the module docstring."""
    try:
        validate_data_config(cfg)
    except (ValueError, FileNotFoundError, KeyError) as e:
        return [], [f"config: {error_line(e)}"]
    try:
        tokenizer = pipeline.load_tokenizer(cfg)
    except (ValueError, OSError) as e:
        return [], [f"config.data.tokenizer: {error_line(e)}"]
    reports = [check_section(cfg, section, sample, tokenizer) for section in prepare.sections(cfg)]
    return reports, [p for r in reports for p in r.problems]
