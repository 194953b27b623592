"""Where a run's messages go: a quiet console and a log file in the run directory.

`setup(verbose)` (called by the `cclm-jax` entry point before anything is logged):
- stderr: the run's own progress lines (records of the `PROGRESS` logger, bare text: the start, the input shards,
  the data's skipped-record counts, one line per log step, evaluations), warnings of this package (`warning: ...`)
  and errors of any library; stdout is left to the command's result (the final JSON);
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

import collections
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
_FORMAT = "%(levelname).1s%(asctime)s %(process)d %(name)s %(filename)s:%(lineno)d] %(message)s"

progress = logging.getLogger(PROGRESS)


class _Buffer(logging.handlers.BufferingHandler):
    """Keeps the latest records until `log_to_file` hands them to the file."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.buffer = collections.deque(maxlen=capacity)

    def shouldFlush(self, record) -> bool:  # noqa: N802 (logging's API)
        return False


class _Stderr(logging.StreamHandler):
    """A handler on `sys.stderr` as it is when a record is written (tests and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the current one is always used
        del value


def _on_console(record: logging.LogRecord) -> bool:
    """Progress lines, warnings of this package and errors of anyone."""
    if record.name == PROGRESS:
        return True
    own = record.name == OWN_PREFIX or record.name.startswith(OWN_PREFIX + ".")
    return record.levelno >= logging.ERROR or (own and record.levelno >= logging.WARNING)


class _ConsoleFormatter(logging.Formatter):
    """Progress lines as they are, the rest as `warning: ...` / `error: ...`."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.name == PROGRESS else f"{record.levelname.lower()}: {text}"


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
    root.addHandler(_mark(_Buffer(_BUFFER_RECORDS)))
    if verbose:  # absl's handler shows everything on stderr
        return
    from absl import logging as absl_logging

    absl_handler = absl_logging.get_absl_handler()
    if absl_handler in root.handlers:
        root.removeHandler(absl_handler)
    console = _Stderr()
    console.addFilter(_on_console)
    console.setFormatter(_ConsoleFormatter())
    root.addHandler(_mark(console))


def log_path(workdir: str, process_index: int = 0) -> str:
    name = LOG_FILE if process_index == 0 else f"log.process_{process_index}.txt"
    return os.path.join(workdir, name)


def log_to_file(workdir: str, process_index: int = 0) -> str | None:
    """Append every record (those kept since `setup` first) to the run's log file; returns its path (None when
    `setup` was not called, e.g. a run from Python: logging is then left as the caller set it)."""
    root = logging.getLogger()
    buffers = [h for h in _handlers() if isinstance(h, _Buffer)]
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
