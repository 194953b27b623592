"""Result reports: ``results.json``, a markdown table per task (``results.md``) and a bar chart per task.

``results`` is ``{task: {language: {metric: value}}}`` with values in percent (as ``metrics`` returns
them). Each task's table has one row per language and a final row with the headline average of every
metric over languages: English is left out for IGLUE tasks (``metrics.average_excludes``), and a metric
is averaged over the languages that report it.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from cclm_jax.evaluation import metrics  # noqa: E402

Results = Mapping[str, Mapping[str, Mapping[str, float]]]

RETRIEVAL_ORDER = ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean",
                   "r_mean")
# Metrics drawn in a task's chart, first family found wins; otherwise every metric is drawn.
CHART_METRICS = (("txt_r1", "img_r1", "r_mean"), ("acc",), ("accuracy",))
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.&+-]*$")


def validate_results(results: Results) -> None:
    """Raises ``ValueError`` naming the task/language/metric of the first malformed entry."""
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty mapping task -> language -> metric -> value")
    for task, per_language in results.items():
        if not isinstance(task, str) or not _TASK_NAME.match(task):
            raise ValueError(f"task name {task!r} must be letters, digits and _ . & + - (it names a file)")
        if not isinstance(per_language, Mapping) or not per_language:
            raise ValueError(f"results[{task!r}] must be a non-empty mapping language -> metrics")
        for language, values in per_language.items():
            if not isinstance(language, str) or not language:
                raise ValueError(f"results[{task!r}] has a language key {language!r}; expected a string")
            if not isinstance(values, Mapping) or not values:
                raise ValueError(f"results[{task!r}][{language!r}] must be a non-empty mapping metric -> value")
            for metric, value in values.items():
                if not isinstance(metric, str):
                    raise ValueError(f"results[{task!r}][{language!r}] has a metric key {metric!r}; expected a string")
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                    raise ValueError(f"results[{task!r}][{language!r}][{metric!r}] = {value!r} is not a finite number")


def metric_names(per_language: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The task's metrics: retrieval metrics in the reference order, then the others sorted."""
    present = {m for values in per_language.values() for m in values}
    return [m for m in RETRIEVAL_ORDER if m in present] + sorted(present - set(RETRIEVAL_ORDER))


def language_order(per_language: Mapping[str, object]) -> list[str]:
    """English first, then the other languages alphabetically."""
    return sorted(per_language, key=lambda lang: (lang != metrics.SOURCE_LANGUAGE, lang))


def task_averages(task: str, per_language: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """metric -> headline average over languages (see the module docstring); metrics with no language left
    after the exclusion are omitted."""
    excluded = set(metrics.average_excludes(task))
    out = {}
    for metric in metric_names(per_language):
        values = {lang: v[metric] for lang, v in per_language.items() if metric in v and lang not in excluded}
        if values:
            out[metric] = metrics.language_average(values)
    return out


def average_label(task: str) -> str:
    excluded = metrics.average_excludes(task)
    return f"avg (excl. {', '.join(excluded)})" if excluded else "avg (all)"


def markdown_table(task: str, per_language: Mapping[str, Mapping[str, float]]) -> str:
    """One markdown section: a row per language and the average row; values with 2 decimals."""
    names = metric_names(per_language)
    lines = [f"## {task}", "", "| language | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    for language in language_order(per_language):
        cells = [f"{per_language[language][m]:.2f}" if m in per_language[language] else "-" for m in names]
        lines.append(f"| {language} | " + " | ".join(cells) + " |")
    averages = task_averages(task, per_language)
    cells = [f"{averages[m]:.2f}" if m in averages else "-" for m in names]
    lines.append(f"| **{average_label(task)}** | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart_metrics(per_language: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Metrics drawn in a task's bar chart (see ``CHART_METRICS``)."""
    names = metric_names(per_language)
    for family in CHART_METRICS:
        chosen = [m for m in family if m in names]
        if chosen:
            return chosen
    return names


def bar_chart(task: str, per_language: Mapping[str, Mapping[str, float]], out_path: str) -> None:
    """PNG of the task's chart metrics per language (grouped bars, percent on the y axis)."""
    languages, drawn = language_order(per_language), chart_metrics(per_language)
    width = 0.8 / len(drawn)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(languages) * len(drawn) + 1.5), 3.5), dpi=100)
    try:
        for j, metric in enumerate(drawn):
            xs = [i + (j - (len(drawn) - 1) / 2) * width for i in range(len(languages))]
            ys = [per_language[lang].get(metric, float("nan")) for lang in languages]
            ax.bar(xs, ys, width=width, label=metric)
        ax.set_xticks(range(len(languages)), languages)
        ax.set_ylabel("%")
        ax.set_title(task)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out_path, format="png")
    finally:
        plt.close(fig)


def write_results(results: Results, out_dir: str | os.PathLike) -> dict[str, str]:
    """Writes ``results.json`` (``results`` with values as floats), ``results.md`` and ``<task>.png`` per task.

    Args:
      results: task -> language -> metric -> value (percent; Python or numpy real numbers).
      out_dir: folder, created if absent; existing files of the same names are replaced.
    Returns:
      ``{"json": path, "markdown": path, "chart:<task>": path, ...}``.
    """
    validate_results(results)
    results = {task: {lang: {m: float(v) for m, v in values.items()} for lang, values in per_language.items()}
               for task, per_language in results.items()}
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    written = {"json": os.path.join(out_dir, "results.json"), "markdown": os.path.join(out_dir, "results.md")}
    with open(written["json"], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")
    sections = [markdown_table(task, per_language) for task, per_language in results.items()]
    with open(written["markdown"], "w", encoding="utf-8") as f:
        f.write("# Results\n\n" + "\n".join(sections))
    for task, per_language in results.items():
        written[f"chart:{task}"] = os.path.join(out_dir, f"{task}.png")
        bar_chart(task, per_language, written[f"chart:{task}"])
    return written


def read_results(path: str | os.PathLike) -> dict[str, dict[str, dict[str, float]]]:
    """Loads a ``results.json`` written by ``write_results`` (a file path or its folder)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    validate_results(results)
    return results
