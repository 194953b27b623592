"""What a config's data sections need prepared, and ``cclm-jax data prepare``.

``section_recipe(cfg, section)`` is the ``builders.Recipe`` of a reader section (``image_caption``, ``eval``,
``parallel_text``) that reads input files (kinds ``jsonl``, ``img2dataset``, ``aligned_text``,
``wikimatrix``, and ``demo``: the generated json-lines), or None for kind ``tfds`` (prepared
already); glob patterns in ``paths`` (``/data/cc3m/*.tar``) are expanded. ``sections(cfg)`` lists
the sections a training run reads (the mix's kinds, and ``eval``). ``prepare_config(cfg, out_dir,
...)`` builds every section's dataset into ``out_dir`` (``data.data_dir/prepared`` by default) and
returns, per section, the dataset name and the ``--config.data.<section>.*`` overrides that make a
training run read it.
"""
import dataclasses
import os

import tensorflow as tf

from cclm_jax.data import builders, img2dataset
from cclm_jax.data import demo as demo_lib
from cclm_jax.data.config import translation_files
from cclm_jax.data.mixture import Mixture


def sections(cfg) -> list[str]:
    """The reader sections a training run with ``cfg`` (``config.data``) reads."""
    return [kind for kind in Mixture(dict(cfg.mix)).kinds] + ["eval"]


def _demo_paths(cfg) -> dict:
    spec = demo_lib.DemoSpec(**cfg.demo.to_dict())
    return demo_lib.prepare_demo(os.path.join(os.path.expanduser(cfg.data_dir), "demo"), spec)


def _local(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def expand(paths) -> list[str]:
    """Paths with glob patterns (``*``, ``?``, ``[``; local or ``gs://``) expanded, sorted, in order."""
    out = []
    for path in paths:
        path = _local(path)
        if any(c in path for c in "*?["):
            matches = sorted(tf.io.gfile.glob(path))
            if not matches:
                raise FileNotFoundError(f"no file matches {path!r}")
            out.extend(matches)
        else:
            out.append(path)
    return out


def section_recipe(cfg, section: str) -> builders.Recipe | None:
    """The recipe of reader section ``section`` of ``cfg`` (``config.data``); None for kind tfds."""
    reader = cfg[section]
    if reader.kind == "tfds":
        return None
    if section == "parallel_text":
        if reader.kind == "demo":
            return builders.Recipe("parallel_text", "jsonl", {"train": [_demo_paths(cfg)["parallel"]]})
        entries = (expand(reader.paths) if reader.kind != "aligned_text"
                   else [[_local(q) for q in pair] for pair in reader.paths])
        options = {"min_score": float(reader.min_score)} if reader.kind == "wikimatrix" else {}
        return builders.Recipe("parallel_text", reader.kind, {"train": entries}, options)
    if reader.kind == "demo":
        path = _demo_paths(cfg)["train" if section == "image_caption" else "val"]
        return builders.Recipe("image_caption", "jsonl", {"train": [path]},
                               {"image_field": "binary", "caption_fields": {"caption": ""}, "image_root": ""})
    paths = expand(reader.paths)
    if reader.kind == "jsonl":
        root = _local(reader.image_root) if reader.image_root else ""
        return builders.Recipe("image_caption", "jsonl", {"train": paths}, {
            "image_field": reader.image_field, "caption_fields": reader.caption_fields.to_dict() or {"caption": ""},
            "image_root": root})
    formats = {reader.format} if reader.format else {img2dataset.format_of(p) for p in paths}
    if len(formats) != 1:
        raise ValueError(f"config.data.{section}.paths mixes img2dataset layouts {sorted(formats)}; "
                         "prepare one layout per section")
    options = {"caption_language": reader.caption_language, "join_field": reader.join_field,
               "translations": {lang: _local(p) for lang, p in translation_files(reader).items()}}
    return builders.Recipe("image_caption", formats.pop(), {"train": paths}, options)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One prepared section: ``name`` (``<builder>/<name>``), ``data_dir``, examples, skip counts."""

    section: str
    name: str
    data_dir: str
    num_examples: int
    skipped: dict

    def overrides(self) -> list[str]:
        """The command-line overrides that make a run read this dataset."""
        key = f"--config.data.{self.section}"
        return [f"{key}.kind=tfds", f"{key}.tfds_name={self.name}", f"{key}.tfds_data_dir={self.data_dir}",
                f"{key}.tfds_split=train"]


def prepare_config(cfg, out_dir: str = "", *, beam_options: list[str] | None = None, file_format: str = "tfrecord",
                   num_shards: int | None = None) -> list[Prepared]:
    """Build the dataset of every section of ``sections(cfg)`` that reads input files (see the module docstring)."""
    out_dir = out_dir or os.path.join(os.path.expanduser(cfg.data_dir), "prepared")
    out_dir = _local(out_dir)
    done = []
    for section in sections(cfg):
        recipe = section_recipe(cfg, section)
        if recipe is None:
            continue
        builder = builders.prepare(recipe, out_dir, beam_options=beam_options, file_format=file_format,
                                   num_shards=num_shards)
        info = builder.info
        done.append(Prepared(section, f"{builders.BUILDER_NAMES[recipe.kind]}/{builder.builder_config.name}",
                             out_dir, int(info.splits["train"].num_examples), dict(info.metadata.get("skipped", {}))))
    return done
