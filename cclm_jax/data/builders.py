"""Pre-training datasets prepared with TFDS, in-process or as an Apache Beam pipeline.

``prepare(recipe, data_dir, ...)`` builds one dataset from a ``Recipe``: a batch ``kind``
(``image_caption`` or ``parallel_text``), an input ``format``, reader ``options`` and
``splits`` = {split: [input entries]}. Formats and their readers:

* image_caption: ``jsonl`` (CCLM json-lines, ``sources.image_caption_examples``; options
  ``image_field``, ``caption_fields``, ``image_root``), ``webdataset`` / ``parquet`` /
  ``tfrecord`` (img2dataset shards, ``img2dataset``; options ``caption_language``,
  ``translations``, ``join_field``);
* parallel_text: ``jsonl`` and ``aligned_text`` (``sources.parallel_text_examples``; an aligned
  entry is ``[path_1, path_2]``), ``wikimatrix`` (``converters``; options ``min_score``,
  ``languages``).

The dataset is ``cclm_image_caption/<name>`` or ``cclm_parallel_text/<name>`` under ``data_dir``
(a local directory or ``gs://...``), version 1.0.0, in sharded ``tfrecord`` or ``array_record``
files; ``name`` defaults to a hash of the recipe and of every input's size and mtime. Features:
image–caption ``image`` (the encoded bytes exactly as read: never decoded and re-encoded),
``captions`` and ``languages`` (string sequences); parallel text ``text_1``, ``text_2``,
``lang_1``, ``lang_2``.

One input entry (a shard, a file, an aligned pair) is one unit of work. Without Beam the units
are read in order in this process; with ``beam_options`` (a list of Beam flags, e.g.
``["--runner=DataflowRunner", "--project=P", "--region=R", "--temp_location=gs://b/tmp"]``;
``[]`` = the DirectRunner) they are distributed by the runner: ``Create(units) | Reshuffle |
FlatMap(read)``. Example keys are ``<unit>-<ordinal>``; TFDS orders examples by a hash of the key,
so both paths write the same examples in the same order. The files split that order differently
(TFDS's writers: in-process into equal counts, Beam into equal ranges of the key hash), each
deterministically: the same inputs give the same files. Records skipped
by the readers are counted per reason (Beam metrics counters on a runner) and stored in the dataset
metadata as ``metadata["skipped"]``, next to ``metadata["cclm_jax"]`` (kind, format, options,
input count). A dataset without any usable example raises ValueError naming the inputs.

``open_prepared(name, data_dir)`` opens a prepared tfrecord dataset as a ``sources.Source``
(serialized records, parsed after batching, like the json-lines builders; ``array_record`` files
are for random-access loaders: ``tfds.data_source``, grain); ``is_prepared_name(name)``
tells such names from TFDS catalog names.
"""
import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cclm_jax.data import converters, img2dataset, sources

FORMATS = {"image_caption": ("jsonl", "webdataset", "parquet", "tfrecord"),
           "parallel_text": ("jsonl", "aligned_text", "wikimatrix")}
BUILDER_NAMES = {"image_caption": "cclm_image_caption", "parallel_text": "cclm_parallel_text"}
FILE_FORMATS = ("tfrecord", "array_record")
COUNTER_NAMESPACE = "cclm_jax.skipped"
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What to build: ``kind``, input ``format``, reader ``options``, ``splits`` {split: [entries]}."""

    kind: str
    format: str
    splits: dict
    options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in FORMATS:
            raise ValueError(f"recipe kind must be one of {tuple(FORMATS)}, got {self.kind!r}")
        if self.format not in FORMATS[self.kind]:
            raise ValueError(f"{self.kind} input format must be one of {FORMATS[self.kind]}, got {self.format!r}")
        for split, entries in self.splits.items():
            if not entries:
                raise ValueError(f"split {split!r} has no input files")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls(**json.loads(text))

    def paths(self) -> list[str]:
        """Every input file of every split."""
        return [p for entries in self.splits.values() for e in entries for p in ([e] if isinstance(e, str) else e)]


def entry_examples(recipe: Recipe, entry, counter) -> Iterator[tuple[str, dict]]:
    """(location, canonical example) of one input entry of ``recipe`` (module docstring)."""
    options = recipe.options
    if recipe.kind == "image_caption":
        if recipe.format == "jsonl":
            return sources.image_caption_examples([entry], counter=counter, **options)
        return img2dataset.examples(entry, recipe.format, counter=counter, **options)
    if recipe.format == "wikimatrix":
        return converters.wikimatrix_examples(entry, counter=counter, **options)
    return sources.parallel_text_examples([entry], counter=counter)


def fingerprint(recipe: Recipe) -> str:
    """Hash of the recipe and of every input's size and mtime (local or ``tf.io.gfile`` paths)."""
    stats = []
    for path in recipe.paths():
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"input file {path!r} does not exist")
        st = tf.io.gfile.stat(path)
        stats.append((path, int(st.length), int(st.mtime_nsec // 10**9)))
    return hashlib.sha256(json.dumps([recipe.to_json(), stats]).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- reading units

class _BeamCounter(sources.SkipCounter):
    """Counts skips as Beam metrics counters (summed over all workers by the runner)."""

    def skip(self, reason: str, where: str, detail: str = ""):
        import apache_beam as beam

        super().skip(reason, where, detail)
        beam.metrics.Metrics.counter(COUNTER_NAMESPACE, reason).inc()


def unit_examples(unit: tuple[int, object], recipe_json: str, counter=None) -> Iterator[tuple[str, dict]]:
    """(key, example) of input entry ``unit = (index, entry)``; keys ``<index>-<ordinal>``. A Beam
    worker calls it with ``counter=None`` (counting into Beam metrics)."""
    index, entry = unit
    counter = _BeamCounter() if counter is None else counter
    examples = entry_examples(Recipe.from_json(recipe_json), entry, counter)
    for ordinal, (_, example) in enumerate(examples):
        yield f"{index:06d}-{ordinal:09d}", example


class _PreparedBuilder(tfds.core.GeneratorBasedBuilder):
    """A recipe dataset (module docstring); ``use_beam`` chooses the path of ``_generate_examples``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    KIND = ""
    PARSE_SPEC: dict = {}

    def __init__(self, *args, use_beam: bool = False, **kwargs):
        self.use_beam = use_beam
        self.counter = sources.SkipCounter()
        super().__init__(*args, **kwargs)

    @property
    def recipe(self) -> Recipe:
        return Recipe.from_json(self.builder_config.recipe_json)

    def _features(self) -> dict:
        raise NotImplementedError

    def _info(self):
        recipe = self.recipe
        marker = {"kind": recipe.kind, "format": recipe.format, "options": recipe.options,
                  "inputs": len(recipe.paths())}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(self._features()),
                                     metadata=tfds.core.MetadataDict(cclm_jax=marker))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(entries) for split, entries in self.recipe.splits.items()}

    def _generate_examples(self, entries):
        units = list(enumerate(entries))
        recipe_json = self.builder_config.recipe_json
        if self.use_beam:
            import apache_beam as beam

            return (beam.Create(units) | "Distribute" >> beam.Reshuffle()
                    | "Read" >> beam.FlatMap(unit_examples, recipe_json))
        return self._local_examples(units, recipe_json)

    def _local_examples(self, units, recipe_json):
        produced = 0
        for unit in units:
            for key, example in unit_examples(unit, recipe_json, self.counter):
                produced += 1
                yield key, example
        if not produced:
            raise ValueError(f"{self.name}/{self.builder_config.name}: no usable example in "
                             f"{[entry for _, entry in units]}; skipped: {dict(self.counter.counts)}")
        self.info.metadata["skipped"] = dict(self.counter.counts)  # cumulative over the splits

    def _process_pipeline_result(self, pipeline_result):
        import apache_beam as beam

        query = beam.metrics.MetricsFilter().with_namespace(COUNTER_NAMESPACE)
        counters = pipeline_result.metrics().query(query)["counters"]
        skipped: dict[str, int] = {}
        for counter in counters:
            value = counter.committed if counter.committed is not None else counter.attempted
            skipped[counter.key.metric.name] = skipped.get(counter.key.metric.name, 0) + int(value)
        self.info.metadata["skipped"] = dict(sorted(skipped.items()))


class CclmImageCaption(_PreparedBuilder):
    """Image–caption pairs: ``image`` bytes, ``captions``, ``languages``."""

    KIND = "image_caption"
    PARSE_SPEC = sources.ImageCaptionJsonl.PARSE_SPEC

    def _features(self):
        return {"image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "languages": tfds.features.Sequence(tfds.features.Text())}


class CclmParallelText(_PreparedBuilder):
    """Parallel sentences: ``text_1``, ``text_2``, ``lang_1``, ``lang_2``."""

    KIND = "parallel_text"
    PARSE_SPEC = sources.ParallelText.PARSE_SPEC

    def _features(self):
        return {key: tfds.features.Text() for key in ("text_1", "text_2", "lang_1", "lang_2")}


_BUILDERS = {"image_caption": CclmImageCaption, "parallel_text": CclmParallelText}


# ----------------------------------------------------------------------------- prepare and open

def beam_flags(options: str) -> list[str]:
    """TFDS-style ``--beam_pipeline_options`` ("runner=DataflowRunner,project=p,...") -> Beam flags."""
    flags = []
    for item in filter(None, (part.strip() for part in options.split(","))):
        if "=" not in item and not item.startswith("--"):
            raise ValueError(f"--beam_pipeline_options: {item!r} is not key=value")
        flags.append(item if item.startswith("--") else f"--{item}")
    return flags


def builder_for(recipe: Recipe, data_dir: str, *, name: str = "", use_beam: bool = False) -> _PreparedBuilder:
    """The (unbuilt) builder of ``recipe`` in ``data_dir`` named ``name`` (default: its fingerprint)."""
    config = sources.RecipeConfig(name=name or fingerprint(recipe), recipe_json=recipe.to_json())
    return _BUILDERS[recipe.kind](config=config, data_dir=data_dir, use_beam=use_beam)


def prepare(recipe: Recipe, data_dir: str, *, name: str = "", file_format: str = "tfrecord",
            beam_options: list[str] | None = None, num_shards: int | None = None) -> tfds.core.DatasetBuilder:
    """Build ``recipe`` once into ``data_dir`` (module docstring) and return the prepared builder.

    ``beam_options`` None: in this process; a list of Beam flags: a Beam pipeline (``[]``: DirectRunner).
    ``num_shards``: files per split (None: TFDS's choice, ~1 GiB per file); a multiple of the training hosts
    gives every host whole files of its own."""
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format must be one of {FILE_FORMATS}, got {file_format!r}")
    use_beam = beam_options is not None
    builder = builder_for(recipe, data_dir, name=name, use_beam=use_beam)
    if builder.is_prepared():
        return builder
    if num_shards is not None and (isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1):
        raise ValueError(f"num_shards must be a positive integer or None, got {num_shards!r}")
    download_config = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP,
                                                   num_shards=num_shards)
    if use_beam:
        try:
            from apache_beam.options.pipeline_options import PipelineOptions
        except ImportError as e:
            raise ValueError("Beam preparation needs Apache Beam: pip install 'cclm_jax[apache-beam]'") from e
        download_config.beam_options = PipelineOptions(flags=list(beam_options))
    try:
        builder.download_and_prepare(file_format=file_format, download_config=download_config)
    except ValueError as e:  # a Beam pipeline that wrote no example fails in TFDS's writer
        if "number of generated examples is 0" not in str(e):
            raise
        raise ValueError(f"{builder.name}/{builder.builder_config.name}: no usable example in {recipe.paths()}; "
                         f"the skipped records were logged by the workers ({COUNTER_NAMESPACE} counters)") from None
    return _BUILDERS[recipe.kind](config=builder.builder_config, data_dir=data_dir)


def is_prepared_name(name: str) -> bool:
    """Whether a ``tfds_name`` names a dataset of this module (``cclm_image_caption/<name>``, ...)."""
    return name.split("/")[0] in BUILDER_NAMES.values()


def load_prepared(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """The prepared dataset ``<builder>/<name>[:<version>]`` under ``data_dir`` (read from its files:
    no recipe or input is needed)."""
    dataset, _, version = name.partition(":")
    parts = dataset.split("/")
    if len(parts) != 2 or not is_prepared_name(dataset):
        raise ValueError(f"{name!r} is not a prepared dataset name (expected one of "
                         f"{sorted(BUILDER_NAMES.values())} / <name>[:version])")
    root = tf.io.gfile.join(data_dir, *parts)
    versions = sorted(v for v in (p.rstrip("/") for p in (tf.io.gfile.listdir(root)
                                                            if tf.io.gfile.isdir(root) else []))
                      if tf.io.gfile.exists(tf.io.gfile.join(root, v, "dataset_info.json")))
    if version:
        versions = [v for v in versions if v == version]
    if not versions:
        raise FileNotFoundError(f"prepared dataset {name!r} not found under {data_dir!r} (no "
                                f"{root}/<version>/dataset_info.json); build it with `cclm-jax data prepare`")
    return tfds.builder_from_directory(tf.io.gfile.join(root, versions[-1]))


def source_of(builder: tfds.core.DatasetBuilder) -> sources.Source:
    """A prepared dataset's builder as a ``sources.Source`` with its build-time skip counts."""
    name = f"{builder.name}/{builder.builder_config.name if builder.builder_config else ''}"
    kind = dict(builder.info.metadata or {}).get("cclm_jax", {}).get("kind")
    if kind not in _BUILDERS:
        raise ValueError(f"{name!r} in {builder.data_dir!r} was not written by `cclm-jax data prepare`")
    if builder.info.file_format.file_suffix != "tfrecord":
        raise ValueError(f"{name!r} in {builder.data_dir!r} is in {builder.info.file_format.value} files, which are "
                         "for random-access loaders (tfds.data_source, grain); training reads tfrecord: prepare it "
                         "with --file_format=tfrecord")
    skipped = dict(builder.info.metadata.get("skipped", {}))
    return sources.Source(builder, skipped, parse_spec=_BUILDERS[kind].PARSE_SPEC)


def open_prepared(name: str, data_dir: str) -> sources.Source:
    """The prepared dataset ``name`` under ``data_dir`` as a ``sources.Source`` (``load_prepared``, ``source_of``)."""
    return source_of(load_prepared(name, data_dir))
