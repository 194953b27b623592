"""Where a run's messages go: a quiet console and a log file in the run directory.

`setup(verbose)` (called by the `cclm-jax` entry point before anything is logged):
- stdout: the run's own progress lines only (records of the `PROGRESS` logger, bare text: the start, the data's
  skipped-record counts, one line per log step, evaluations), then the final JSON;
- stderr: warnings and errors of this package (`warning: ...`) and errors of any library;
- the log file: every record at INFO and above, with time and source (clu's full metric dump, Orbax, absl,
  TensorFlow/TFDS and our own lines). Records logged before the run directory is known are kept in memory and
  written when `log_to_file(workdir)` opens `workdir/log.txt` (process 0; `log.process_<i>.txt` on the others);
  a command that never opens one (`info`, `export`, a user error before the run directory) drops them.
- `verbose` (`--verbosity=1`, `CCLM_TRACEBACK=1`): absl's own handler stays as well, so everything also goes to
  stderr, as before.

TensorFlow's native start-up messages (oneDNN, written to file descriptor 2 before any Python logging exists)
are caught with `native_stderr_to_log()` around the first TensorFlow import and logged at INFO.
"""
from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping

PROGRESS = "cclm_jax.progress"
OWN_PREFIX = "cclm_jax"
LOG_FILE = "log.txt"
_BUFFER_RECORDS = 100_000  # records kept before the log file exists (the oldest are dropped beyond this)
_FORMAT = "%(levelname).1s%(asctime)s %(process)d %(name)s:%(lineno)d] %(message)s"

progress = logging.getLogger(PROGRESS)


class _Buffer(logging.handlers.BufferingHandler):
    """Keeps records until `log_to_file` hands them to the file (a bounded deque: the oldest go first)."""

    def shouldFlush(self, record) -> bool:  # noqa: N802 (logging's API)
        if len(self.buffer) > self.capacity:
            del self.buffer[0]
        return False


def _is_progress(record: logging.LogRecord) -> bool:
    return record.name == PROGRESS


def _is_console_problem(record: logging.LogRecord) -> bool:
    """Warnings of this package and errors of anyone (progress lines excluded)."""
    if _is_progress(record):
        return False
    own = record.name == OWN_PREFIX or record.name.startswith(OWN_PREFIX + ".")
    return record.levelno >= logging.ERROR or (own and record.levelno >= logging.WARNING)


class _LowerLevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, "_cclm_console", False)]


def _mark(handler: logging.Handler) -> logging.Handler:
    handler._cclm_console = True  # noqa: SLF001 (ours: found again by `_handlers`)
    return handler


def setup(verbose: bool = False) -> None:
    """Route the root logger as the module docstring says (idempotent: a second call replaces the first)."""
    root = logging.getLogger()
    for handler in _handlers():
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    from absl import logging as absl_logging

    absl_handler = absl_logging.get_absl_handler()
    if not verbose and absl_handler in root.handlers:
        root.removeHandler(absl_handler)
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_is_progress)
    out.setFormatter(logging.Formatter("%(message)s"))
    err = logging.StreamHandler(sys.stderr)
    err.addFilter(_is_console_problem)
    err.setFormatter(_LowerLevelFormatter())
    buffer = _Buffer(_BUFFER_RECORDS)
    buffer._cclm_buffer = True  # noqa: SLF001
    for handler in [out, buffer] if verbose else [out, err, buffer]:  # verbose: absl's handler shows problems
        root.addHandler(_mark(handler))


def log_path(workdir: str, process_index: int = 0) -> str:
    name = LOG_FILE if process_index == 0 else f"log.process_{process_index}.txt"
    return os.path.join(workdir, name)


def log_to_file(workdir: str, process_index: int = 0) -> str | None:
    """Append every record (those kept since `setup` first) to the run's log file; returns its path (None when
    `setup` was not called, e.g. a run from Python: logging is then left as the caller set it)."""
    root = logging.getLogger()
    buffers = [h for h in _handlers() if getattr(h, "_cclm_buffer", False)]
    if not buffers:
        return None
    path = log_path(workdir, process_index)
    file_handler = _mark(logging.FileHandler(path, encoding="utf-8"))
    file_handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%m%d %H:%M:%S"))
    for buffer in buffers:
        for record in buffer.buffer:
            file_handler.handle(record)
        root.removeHandler(buffer)
        buffer.close()
    root.addHandler(file_handler)
    return path


@contextlib.contextmanager
def native_stderr_to_log(logger: logging.Logger | None = None) -> Iterator[None]:
    """Send what native code writes to file descriptor 2 inside the block to `logger` at INFO (TensorFlow's
    start-up banner); when the block raises, the text goes back to stderr instead."""
    logger = logger or logging.getLogger(OWN_PREFIX + ".native")
    sys.stderr.flush()
    saved = os.dup(2)
    failed = True
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace").strip()
            if text and failed:
                print(text, file=sys.stderr)
            elif text:
                logger.info("native output: %s", text)


def describe_skips(input_metrics: Mapping[str, float]) -> str:
    """The start line about the data's skipped records, from `data/<kind>/skipped_<reason>` (or
    `data/skipped_<reason>`) counters: 'data: no record skipped' or 'data: skipped records (not trained on):
    image_caption corrupt_image=2 missing_image_file=1; ...'."""
    by_kind: dict[str, list[str]] = {}
    for name, value in sorted(input_metrics.items()):
        parts = name.split("/")
        if parts[0] != "data" or not parts[-1].startswith("skipped_") or not value:
            continue
        kind = "/".join(parts[1:-1]) or "data"
        by_kind.setdefault(kind, []).append(f"{parts[-1].removeprefix('skipped_')}={int(value)}")
    if not by_kind:
        return "data: no record skipped"
    return "data: skipped records (not used): " + "; ".join(f"{k} {' '.join(v)}" for k, v in by_kind.items())
