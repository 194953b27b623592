"""Checkpoints: an Orbax CheckpointManager holding the train state and the data-iterator positions.

Layout: `workdir/checkpoints/<step>/{state, data}`; `state` is the `TrainState` pytree (params, optimizer
state, step, RNG, counters), `data` the per-kind iterator positions (JSON). Saves are asynchronous; a save
becomes visible only once complete (Orbax writes to a temporary directory and renames it), so a run
killed mid-save resumes from the previous complete checkpoint and never reads a partial one.

Retention: the last `keep_checkpoints`, plus every multiple of `keep_every`. Preemption: `should_save`
is also true at Orbax's preemption sync point (TPU maintenance events) and after SIGTERM (see
`PreemptionWatcher`), so the loop saves, waits for the write and exits cleanly.

Restoring onto a different mesh works: the abstract target state carries the new shardings and Orbax
reads every array straight into them.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp


class PreemptionWatcher:
    """Turns SIGTERM (what schedulers and `kill` send before a hard stop) into a flag the loop polls."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def __enter__(self) -> "PreemptionWatcher":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._event.set())
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    @property
    def requested(self) -> bool:
        return self._event.is_set()


class Checkpointer:
    """Save/restore of (TrainState, data positions) under `workdir/checkpoints`."""

    def __init__(self, workdir: str, *, every: int, keep: int, keep_every: int = 0, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
        policies = [ocp.checkpoint_managers.FixedIntervalPolicy(every),
                    ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_every or None, create=True,
            enable_async_checkpointing=async_save,
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies))
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: Mapping[str, Mapping[str, Any]], *, force: bool = False) -> bool:
        """Save if the policy says so at `step` (or `force`); returns whether a save started."""
        data = {kind: {k: int(v) for k, v in s.items()} for kind, s in data_state.items()}
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                               data=ocp.args.JsonSave(data)), force=force)

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, data positions) of `step` (default the latest), into `abstract_state`'s shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        data = {kind: {k: np.int64(v) for k, v in s.items()} for kind, s in (restored.data or {}).items()}
        return restored.state, data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any | None = None) -> Any:
    """ShapeDtypeStructs of `tree` (with `shardings` if given, else each array's own sharding)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
