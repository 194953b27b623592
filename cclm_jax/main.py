"""The `cclm-jax` command line (also `python -m cclm_jax`).

  cclm-jax train    --config configs/demo.py --workdir DIR [--config.train.num_steps=100 ...]
  cclm-jax finetune --config configs/finetune/T.py[:protocol] --workdir DIR   fine-tune, test, report
  cclm-jax evaluate --config C --workdir DIR [--out D] a fine-tuning config: test sets of a fine-tuned run;
                                                      a pre-training config: dev retrieval (--out: the report
                                                      goes to D instead of the run directory)
  cclm-jax info     --config C                        parameter counts (tied weights once), per module
  cclm-jax export   --workdir DIR --out F.th [--step N] [--format th|safetensors]
  cclm-jax import   --checkpoint F.th --workdir DIR [--text_num_heads N]   (N only for files recording none)
  cclm-jax data check   --config C [--sample N]       read every configured source: counts, languages, lengths,
                                                      image sizes, skipped records; exit 1 with one line per problem
  cclm-jax data prepare --config C [--prepared_dir D] [--beam_pipeline_options=runner=DataflowRunner,...]
                        [--file_format tfrecord|array_record] [--num_shards N]   build the config's TFDS datasets
  cclm-jax index    --workdir RUN --images DIR --out INDEX [--texts FILE] [--checkpoint F --tokenizer SPM]
                                                      image (and text) features of a folder, resumable
  cclm-jax search   --index INDEX --query "ein Hund rennt" [--top 10] [--html out.html] [--image]
                                                      text -> images (--image: the query is an image file,
                                                      ranked against the index's texts); cclm_jax.inference
  cclm-jax compile  --config C --topology v5p-16 [...]   ahead-of-time compile for a TPU slice / GPU node from a
                                                      CPU: memory per chip, fit, FLOPs, collectives (cclm_jax.aot)

`--config` takes a config file with `get_config(arg)`; `configs/X.py:arg` passes `arg`, and
`--config.a.b=value` overrides any field (the config is locked: unknown fields are an error).

Console (`train.console`): stderr shows the run's progress lines, this package's warnings and every error, stdout
the command's result (the final JSON); everything else (clu's metric dump, Orbax, absl, TensorFlow) goes to
`WORKDIR/log.txt`.

User errors (`USER_ERRORS`: bad config values, missing or unreadable files, checkpoints that do not fit) print
one line `error: <message>` to stderr and exit with status 2; `--verbosity=1` or the environment variable
`CCLM_TRACEBACK=1` shows the full traceback instead.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from cclm_jax.checkpoint import UnreadableCheckpointsError
from cclm_jax.train import console

COMMANDS = ("train", "finetune", "evaluate", "info", "export", "import", "data", "index", "search")
DATA_COMMANDS = ("check", "prepare")
CHECK_FAILED_STATUS = 1  # `data check` found problems in the data
# Exceptions that mean "the user's config or files are wrong", reported in one line (module docstring).
# FloatingPointError: a diverged run stopped by the trainer (`train.nonfinite`, `train.max_consecutive_skips`);
# UnreadableCheckpointsError: no checkpoint of a run directory can be read.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, FloatingPointError, UnreadableCheckpointsError)
USER_ERROR_STATUS = 2

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config(arg)); path[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config).")
_OUT = flags.DEFINE_string("out", None, "export: output file (.th) or directory (safetensors); evaluate: the "
                           "directory the report is written to (default: the run directory).")
_FORMAT = flags.DEFINE_enum("format", "th", ["th", "safetensors"], "export: checkpoint format.")
_STEP = flags.DEFINE_integer("step", None, "export/evaluate: checkpoint step (default: latest).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "import: official CCLM .th/.pth file.")
_SAMPLE = flags.DEFINE_integer("sample", 1000, "data check: usable examples read per source (0: all).")
_PREPARED_DIR = flags.DEFINE_string("prepared_dir", None, "data prepare: output directory, local or gs:// "
                                    "(default: config.data.data_dir/prepared).")
_BEAM_OPTIONS = flags.DEFINE_string("beam_pipeline_options", None, "data prepare: build with Apache Beam; "
                                    "comma-separated Beam options, e.g. runner=DataflowRunner,project=P,region=R,"
                                    "temp_location=gs://b/tmp ('' or runner=DirectRunner: this machine).")
_FILE_FORMAT = flags.DEFINE_enum("file_format", "tfrecord", ["tfrecord", "array_record"],
                                 "data prepare: file format (training reads tfrecord).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", None, "data prepare: files per dataset (default: TFDS's, "
                                   "~1 GiB each); a multiple of the training hosts gives each host whole files.")
_TEXT_HEADS = flags.DEFINE_integer("text_num_heads", None, "import: text attention heads of a file that records "
                                   "none (default: 16 for width 1024, 12 for 768; a recorded count wins).")
_IMAGES = flags.DEFINE_string("images", None, "index: folder of images to index (recursive).")
_TEXTS = flags.DEFINE_string("texts", None, "index: text file, one candidate sentence per line (for search --image).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "index: SentencePiece model (default: the run's).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "index: images per batch.")
_INDEX = flags.DEFINE_string("index", None, "search: index directory written by `cclm-jax index`.")
_QUERY = flags.DEFINE_string("query", None, "search: the query sentence (with --image: an image file).")
_TOP = flags.DEFINE_integer("top", 10, "search: results to show (ITM re-ranks these).")
_HTML = flags.DEFINE_string("html", None, "search: also write a self-contained HTML page of the results.")
_IMAGE = flags.DEFINE_bool("image", False, "search: the query is an image; rank the index's texts.")
_RERANK = flags.DEFINE_bool("rerank", True, "search: re-rank the top results by the ITM head.")


def _require(flag, command: str):
    if flag.value is None:
        raise app.UsageError(f"cclm-jax {command}: --{flag.name} is required")
    return flag.value


def count_parameters(model_config, layout: str = "pretrain") -> dict[str, int]:
    """Unique parameters per top-level module of `layout`'s model (`interop.layout.LAYOUTS`; the tied MLM
    decoder counted once, as the reference)."""
    from cclm_jax.interop.shapes import param_shapes

    shapes = param_shapes(model_config, layout)
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)  # noqa: E731
    return {name: int(sum(np.prod(s) for s in jax.tree.leaves(sub, is_leaf=is_shape)))
            for name, sub in shapes.items()}


def _with_vocab(model_config: ml_collections.ConfigDict, vocab_size: int, mask_id: int) -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict(model_config.to_dict())
    model.text.update(vocab_size=vocab_size, mask_token_id=mask_id)
    return model


def tokenizer_file(config: ml_collections.ConfigDict) -> str:
    """The SentencePiece file `config.data.tokenizer` names ('' when unset); 'demo' is the generated demo model's
    path (`data.demo.demo_paths`), whether or not a training run has generated it yet."""
    data = config.data
    if data.get("tokenizer") == "demo":
        from cclm_jax.data import demo

        root = os.path.join(os.path.expanduser(data.data_dir), "demo")
        return demo.demo_paths(root, demo.DemoSpec(**data.demo.to_dict()))["spm"]
    return os.path.expanduser(data.get("tokenizer") or "")


def resolve_info_vocab(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, str]:
    """(model config, note) for `info`: `model.text.vocab_size = -1` (taken from the tokenizer at run time) is
    read from the tokenizer file when it exists (nothing is generated or downloaded); the model config keeps
    -1 and the note says why when it cannot be ('' when the vocabulary is known)."""
    if config.model.text.vocab_size != -1:
        return config.model, ""
    path = tokenizer_file(config)
    if not path or not os.path.isfile(path):
        where = f"config.data.tokenizer={config.data.get('tokenizer', '')!r}"
        why = ("the demo tokenizer is generated by the first training run" if config.data.get("tokenizer") == "demo"
               else "no tokenizer file")
        return config.model, f"vocab unresolved: model.text.vocab_size=-1 comes from the tokenizer ({where}: {why})"
    from cclm_jax.data.tokenizer import Tokenizer

    tokenizer = Tokenizer(path, key="config.data.tokenizer")
    return _with_vocab(config.model, tokenizer.vocab_size, tokenizer.mask_id), ""


def cmd_info() -> None:
    from cclm_jax import flops
    from cclm_jax.interop.layout import layout_of_task

    config = _require(_CONFIG, "info")
    model, note = resolve_info_vocab(config)
    layout = layout_of_task(config.get("task"))
    if note:  # counts are linear in the vocabulary size: base + per_entry * vocab
        at_2, at_3 = (count_parameters(_with_vocab(model, v, v - 1), layout) for v in (2, 3))
        per_entry = {k: at_3[k] - at_2[k] for k in at_2}
        counts = {k: at_2[k] - 2 * per_entry[k] for k in at_2}
    else:
        counts, per_entry = count_parameters(model, layout), {}
    total, per_vocab = sum(counts.values()), sum(per_entry.values())
    vocab_term = lambda n: f"  + {n:,} x vocab" if n else ""  # noqa: E731
    if note:
        print(f"note: {note}")
    width = max(len(k) for k in counts)
    print(f"{'module':<{width}}  {'parameters':>13}")
    for name, n in counts.items():
        print(f"{name:<{width}}  {n:>13,}{vocab_term(per_entry.get(name, 0))}")
    print(f"{'total':<{width}}  {total:>13,}{vocab_term(per_vocab)}")
    print(f"total parameters: {total}" + (f" + {per_vocab} x vocab" if note else ""))
    if layout != "pretrain":
        print(f"(the {layout!r} model of config.model; a run from init.checkpoint / init.workdir takes that "
              "checkpoint's architecture)")
    flops_config = config.copy_and_resolve_references()
    flops_config.model = _with_vocab(model, 0, 0) if note else model
    print(flops.describe(flops_config))
    if note and "task" not in config:
        print("(FLOPs leave out the MLM decoder's product with the vocabulary: vocab unresolved)")


def cmd_train() -> None:
    from cclm_jax.train.pretraining import train

    results = train(_require(_CONFIG, "train"), _require(_WORKDIR, "train"))
    print(json.dumps({k: v for k, v in results.items() if np.isscalar(v)}, indent=1, sort_keys=True))


def cmd_finetune() -> None:
    from cclm_jax.train.finetuning import finetune

    out = finetune(_require(_CONFIG, "finetune"), _require(_WORKDIR, "finetune"))
    print(json.dumps(out.get("results", out), indent=1, sort_keys=True, default=float))


def cmd_evaluate() -> None:
    config, workdir = _require(_CONFIG, "evaluate"), _require(_WORKDIR, "evaluate")
    if "task" in config:  # a fine-tuning config (configs/finetune/*.py)
        from cclm_jax.train.finetuning import evaluate
    else:
        from cclm_jax.train.pretraining import evaluate
    log_dir = os.path.abspath(os.path.expanduser(_OUT.value or workdir))
    os.makedirs(log_dir, exist_ok=True)
    console.log_to_file(log_dir)
    results = evaluate(config, workdir, _STEP.value, out=_OUT.value)
    print(json.dumps(results, indent=1, sort_keys=True, default=float))


def cmd_export() -> None:
    from cclm_jax.interop.workdir import export_workdir

    path = export_workdir(_require(_WORKDIR, "export"), _require(_OUT, "export"), step=_STEP.value,
                          fmt=_FORMAT.value)
    print(f"exported to {path}")


def cmd_import() -> None:
    from cclm_jax.train.import_run import import_to_workdir

    step = import_to_workdir(_require(_CHECKPOINT, "import"), _require(_WORKDIR, "import"),
                             text_num_heads=_TEXT_HEADS.value)
    print(f"imported {_CHECKPOINT.value} into {_WORKDIR.value} as step {step}")


def _data_config(command: str) -> ml_collections.ConfigDict:
    config = _require(_CONFIG, f"data {command}")
    if "task" in config:
        raise ValueError(f"cclm-jax data {command} reads pre-training configs; {config.task!r} is a fine-tuning "
                         "config (`cclm-jax finetune` checks its files before compiling)")
    return config.data


def cmd_data_check() -> None:
    from cclm_jax.data.check import check_config

    reports, problems = check_config(_data_config("check"), sample=_SAMPLE.value)
    for report in reports:
        print("\n".join(report.lines()))
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        sys.exit(CHECK_FAILED_STATUS)
    print("data check passed")


def cmd_data_prepare() -> None:
    from cclm_jax.data.builders import beam_flags
    from cclm_jax.data.prepare import prepare_config

    beam = None if _BEAM_OPTIONS.value is None else beam_flags(_BEAM_OPTIONS.value)
    done = prepare_config(_data_config("prepare"), _PREPARED_DIR.value or "", beam_options=beam,
                          file_format=_FILE_FORMAT.value, num_shards=_NUM_SHARDS.value)
    for prepared in done:
        print(f"{prepared.section}: {prepared.name} in {prepared.data_dir}: {prepared.num_examples} examples, "
              f"skipped {prepared.skipped}")
    if not done:
        print("nothing to prepare: every section reads a prepared TFDS dataset already")
        return
    print("train on them with these overrides:\n  " + " \\\n  ".join(o for p in done for o in p.overrides()))


def cmd_index() -> None:
    from cclm_jax import inference

    if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
        raise app.UsageError("cclm-jax index: give one model, --workdir RUN or --checkpoint FILE")
    model = inference.load(_WORKDIR.value or _CHECKPOINT.value, tokenizer=_TOKENIZER.value,
                           text_num_heads=_TEXT_HEADS.value)
    counts = inference.build_index(model, _require(_IMAGES, "index"), _require(_OUT, "index"), texts=_TEXTS.value,
                                   batch_size=_BATCH.value)
    print(json.dumps(counts))


def cmd_search() -> None:
    from cclm_jax import inference

    query = _require(_QUERY, "search")
    results = inference.search(_require(_INDEX, "search"), query, top=_TOP.value, image=_IMAGE.value,
                               rerank=_RERANK.value)
    for rank, (item, value) in enumerate(results, 1):
        print(f"{rank:3d}  {value:9.4f}  {item}")
    if _HTML.value:
        inference.write_html(_HTML.value, query, results, image=_IMAGE.value)
        print(f"wrote {_HTML.value}")


def show_traceback() -> bool:
    """Whether user errors show their traceback: `--verbosity=1` (or more) or `CCLM_TRACEBACK=1`."""
    return flags.FLAGS.verbosity >= 1 or os.environ.get("CCLM_TRACEBACK", "") not in ("", "0")


def user_error_message(error: BaseException) -> str:
    """The one line a user error prints: its message (a KeyError's own, without the repr quotes)."""
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error) or type(error).__name__


def main(argv) -> None:
    if len(argv) < 2 or argv[1] not in COMMANDS or len(argv) != (3 if argv[1] == "data" else 2):
        raise app.UsageError(f"usage: cclm-jax {{{','.join(COMMANDS)}}} [flags]; got {argv[1:]}")
    if argv[1] == "data" and argv[2] not in DATA_COMMANDS:
        raise app.UsageError(f"usage: cclm-jax data {{{','.join(DATA_COMMANDS)}}} --config C; got {argv[2]!r}")
    console.setup(verbose=show_traceback())
    if argv[1] in ("train", "finetune", "evaluate"):
        with console.native_stderr_to_log():  # TensorFlow's start-up banner (written by native code)
            import tensorflow  # noqa: F401
    command = {"train": cmd_train, "finetune": cmd_finetune, "evaluate": cmd_evaluate, "info": cmd_info,
               "export": cmd_export, "import": cmd_import, "index": cmd_index, "search": cmd_search,
               "data check": cmd_data_check, "data prepare": cmd_data_prepare}[" ".join(argv[1:])]
    try:
        command()
    except USER_ERRORS as e:
        if show_traceback():
            raise
        print(f"error: {user_error_message(e)}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)


def run() -> None:
    """Console-script entry point (the command line is `sys.argv`, which `--config.x=y` overrides are read from).

    `cclm-jax compile ...` goes to `cclm_jax.aot.main` (its own options: `cclm-jax compile --help`)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if len(sys.argv) > 1 and sys.argv[1] == "compile":
        from cclm_jax import aot

        aot.main(sys.argv[2:])
        return
    app.run(main, argv=sys.argv)
