"""Checkpoints: an Orbax CheckpointManager holding a run's train state as separate items, and the data positions.

Layout: `workdir/checkpoints/<step>/{params, opt_state, meta, data}`: `params` the parameter pytree, `opt_state` the
optimizer state, `meta` the step, base RNG key and skip counters, `data` the per-kind iterator positions (JSON).
Parameters are their own item so that `export`, `evaluate` and `init.workdir` read them alone
(`restore_params`), never the two Adam moments (3x the memory). Checkpoints of earlier versions, one `state`
item holding the whole `TrainState` (without the consecutive-skip counter), stay readable. An optimizer state of
another layout than the run's (an earlier version's optimizer) is read through `upgrade_opt_state` (the caller's:
`cclm_jax.optimizer.upgrade_legacy_state`); one it cannot convert is an `OptimizerStateLayoutError` naming how to
resume from the parameters, and the checkpoint is left in place.

Saves are asynchronous; a save becomes visible only once complete (Orbax writes to a temporary directory and
renames it), so a run killed mid-save resumes from the previous complete checkpoint and never reads a partial one.
A complete checkpoint that cannot be read (a truncated or bit-flipped array file, a deleted `_METADATA`) is moved
to `workdir/corrupt_checkpoints/<step>` with a warning naming the step and the error, and the previous one is read
(`restore_newest_readable`).

Retention: the last `keep_checkpoints`, plus every multiple of `keep_every`. Preemption: `should_save` is also true
at Orbax's preemption sync point (TPU maintenance events); SIGTERM and Ctrl-C are turned into a flag
(`PreemptionWatcher`) that the trainer agrees on across processes before it saves and exits.

Restoring onto a different mesh works: the abstract target carries the new shardings and Orbax reads every array
straight into them.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from cclm_jax.train_state import TrainState

log = logging.getLogger(__name__)

ITEMS = ("params", "opt_state", "meta", "data")
LEGACY_ITEM = "state"


# (stored tree as Orbax lists it, abstract optimizer state) -> (restore target, upgrade(restored, step) -> state)
OptStateUpgrade = Callable[[Any, Any], tuple[Any, Callable[[Any, Any], Any]]]
RESUME_FROM_PARAMS = ("to continue from its parameters with a fresh optimizer state, run `cclm-jax export --workdir "
                      "<this run> --out F.th`, then `cclm-jax import --checkpoint F.th --workdir <new run>` and "
                      "train in the new run")


class UnreadableCheckpointsError(RuntimeError):
    """No checkpoint of a run directory can be read (each step and its error are in the message)."""


class OptimizerStateLayoutError(ValueError):
    """A checkpoint's optimizer state has a layout this version cannot read (an intact file: it is kept)."""


@flax.struct.dataclass
class LegacyTrainState:
    """The single `state` item of checkpoints written before the state was split into items."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite: jax.Array


class PreemptionWatcher:
    """Turns SIGTERM (what schedulers and `kill` send before a hard stop) and the first Ctrl-C (SIGINT) into a
    flag the trainer polls; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._event.is_set():
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: saving a checkpoint at the end of this step (press again to stop at once)")
        self._event.set()

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    @property
    def requested(self) -> bool:
        return self._event.is_set()


def _meta(state: TrainState) -> dict[str, jax.Array]:
    return {"step": state.step, "rng": state.rng, "nonfinite": state.nonfinite, "skips": state.skips}


class Checkpointer:
    """Save/restore of (TrainState, data positions) under `workdir/checkpoints`."""

    def __init__(self, workdir: str, *, every: int, keep: int, keep_every: int = 0, async_save: bool = True):
        self.workdir = os.path.abspath(os.path.expanduser(workdir))
        self.directory = os.path.join(self.workdir, "checkpoints")
        policies = [ocp.checkpoint_managers.FixedIntervalPolicy(every),
                    ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_every or None, create=True,
            enable_async_checkpointing=async_save,
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies))
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS + (LEGACY_ITEM,))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def save(self, step: int, state: TrainState, data_state: Mapping[str, Mapping[str, Any]], *,
             force: bool = False) -> bool:
        """Save if the policy says so at `step` (or `force`); returns whether a save started."""
        data = {kind: {k: int(v) for k, v in s.items()} for kind, s in data_state.items()}
        return self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.StandardSave(_meta(state)), data=ocp.args.JsonSave(data)), force=force)

    def save_params(self, step: int, params: Any, rng: jax.Array) -> None:
        """A parameters-only checkpoint (`cclm-jax import`): no optimizer state; a run resuming from it starts a
        fresh one. Waits for the write."""
        zero = np.zeros((), np.int32)
        meta = {"step": np.asarray(step, np.int32), "rng": rng, "nonfinite": zero, "skips": zero}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.StandardSave(meta),
            data=ocp.args.JsonSave({})), force=True)
        self.manager.wait_until_finished()

    def has_optimizer_state(self, step: int) -> bool:
        """False for a parameters-only checkpoint (`save_params`)."""
        item = "opt_state" if not self._is_legacy(step) else LEGACY_ITEM
        return os.path.isdir(os.path.join(self.directory, str(step), item))

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def _is_legacy(self, step: int) -> bool:
        return os.path.isdir(os.path.join(self.directory, str(step), LEGACY_ITEM))

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        return step

    def _stored_tree(self, step: int, item: str) -> Any:
        """The tree of a stored item as Orbax lists it (array metadata leaves; lists, dicts, None)."""
        return ocp.PyTreeCheckpointer().metadata(os.path.join(self.directory, str(step), item)).item_metadata.tree

    def _opt_state_target(self, step: int, stored: Any, abstract: Any,
                          upgrade_opt_state: OptStateUpgrade | None) -> tuple[Any, Callable[[Any, Any], Any]]:
        """(restore target, finish(restored, step) -> opt_state) for the stored optimizer state tree `stored`."""
        if set(ocp.tree.to_flat_dict(stored)) == set(ocp.tree.to_flat_dict(abstract)):
            return abstract, lambda restored, _: restored
        where = f"checkpoint step {step} in {self.directory} holds an optimizer state of another layout"
        if upgrade_opt_state is None:
            raise OptimizerStateLayoutError(f"{where}; {RESUME_FROM_PARAMS}")
        try:
            return upgrade_opt_state(stored, abstract)
        except ValueError as e:
            raise OptimizerStateLayoutError(f"{where} ({e}); {RESUME_FROM_PARAMS}") from e

    def restore(self, abstract_state: TrainState, step: int | None = None, *,
                upgrade_opt_state: OptStateUpgrade | None = None) -> tuple[TrainState, dict]:
        """(state, data positions) of `step` (default the latest), into `abstract_state`'s shardings. The state's
        `opt_state` is None for a parameters-only checkpoint (`save_params`); one of another layout is read through
        `upgrade_opt_state` (see the module docstring)."""
        step = self._step(step)
        if self._is_legacy(step):
            stored = self._stored_tree(step, LEGACY_ITEM)["opt_state"]
            target, finish = self._opt_state_target(step, stored, abstract_state.opt_state, upgrade_opt_state)
            legacy = LegacyTrainState(abstract_state.step, abstract_state.params, target, abstract_state.rng,
                                      abstract_state.nonfinite)
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(legacy), data=ocp.args.JsonRestore()))
            old = restored.state
            state = TrainState(step=old.step, params=old.params, opt_state=finish(old.opt_state, old.step),
                               rng=old.rng, nonfinite=old.nonfinite, skips=np.zeros((), np.int32))
        else:
            items = {"params": ocp.args.StandardRestore(abstract_state.params),
                     "meta": ocp.args.StandardRestore(_meta(abstract_state)), "data": ocp.args.JsonRestore()}
            finish = None
            if self.has_optimizer_state(step):
                stored = self._stored_tree(step, "opt_state")
                target, finish = self._opt_state_target(step, stored, abstract_state.opt_state, upgrade_opt_state)
                items["opt_state"] = ocp.args.StandardRestore(target)
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            meta = restored.meta
            opt_state = None if finish is None else finish(restored.opt_state, meta["step"])
            state = TrainState(step=meta["step"], params=restored.params, opt_state=opt_state,
                               rng=meta["rng"], nonfinite=meta["nonfinite"], skips=meta["skips"])
        data = {kind: {k: np.int64(v) for k, v in s.items()} for kind, s in (restored.data or {}).items()}
        return state, data

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """The parameters of `step` (default the latest) into `abstract_params`' shardings; the optimizer state is
        not read. (A legacy single-item checkpoint is read whole on the host and its parameters placed.)"""
        step = self._step(step)
        if self._is_legacy(step):
            item = os.path.join(self.directory, str(step), LEGACY_ITEM)
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                    self._stored_tree(step, LEGACY_ITEM))
            restored = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
            return jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), restored["params"], abstract_params)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))
        return restored.params

    def restore_newest_readable(self, abstract_state: TrainState, *, upgrade_opt_state: OptStateUpgrade | None = None,
                                ) -> tuple[TrainState, dict, list[tuple[int, str]]]:
        """(state, data positions, [(step, reason)] of newer checkpoints that could not be read and were moved to
        `workdir/corrupt_checkpoints/`). Raises UnreadableCheckpointsError naming every step if none can be read,
        and OptimizerStateLayoutError (checkpoint kept) for an optimizer state `upgrade_opt_state` cannot read."""
        failed: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, data = self.restore(abstract_state, step, upgrade_opt_state=upgrade_opt_state)
            except OptimizerStateLayoutError:
                raise
            except Exception as e:  # noqa: BLE001 -- any reader error means this step is unusable
                reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
                log.warning("checkpoint step %d in %s is unreadable (%s); trying the previous one", step,
                            self.directory, reason)
                failed.append((step, reason))
                continue
            for bad, _ in failed:
                self._quarantine(bad)
            if failed:
                log.warning("resumed from step %d; unreadable checkpoints %s were moved to %s", step,
                            [s for s, _ in failed], os.path.join(self.workdir, "corrupt_checkpoints"))
            return state, data, failed
        steps = ", ".join(f"{s} ({r})" for s, r in failed)
        raise UnreadableCheckpointsError(f"no readable checkpoint in {self.directory}: {steps}")

    def _quarantine(self, step: int) -> None:
        """Move an unreadable checkpoint out of the manager's directory (kept for inspection, never deleted)."""
        if jax.process_index() == 0:
            target = os.path.join(self.workdir, "corrupt_checkpoints", str(step))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.exists(target):
                shutil.rmtree(target)
            shutil.move(os.path.join(self.directory, str(step)), target)
        self.manager.reload()

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
