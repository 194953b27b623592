"""Shared assertions on run directories (training workdirs) for the training-program tests."""
import json
import pathlib

import jax
import numpy as np

from cclm_jax.interop.workdir import restore_params

LOSS_SUFFIXES = ("/loss", "/itc", "/ttc", "/mlm")


def workdir_params(workdir) -> dict:
    """The latest checkpoint's parameters of a run directory, as numpy arrays."""
    return jax.tree.map(np.asarray, restore_params(str(workdir))[1])


def assert_bitwise_equal(a, b) -> None:
    """Every leaf of `a` equals the same leaf of `b` bit for bit; a failure names the parameter path."""
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def logged_losses(workdir, suffixes=LOSS_SUFFIXES) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} of the losses a run wrote to its metrics.jsonl."""
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.endswith(suffixes)} for r in rows}
