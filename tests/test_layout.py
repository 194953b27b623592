"""The package layout: which part of `cclm_jax` may import which (no cycles; issue 14 item 3).

Every module's imports are read with `ast`, module-level and function-local alike (a deferred import is still a
dependency). A part is a subpackage (`models`, `data`, ...) or a top-level module (`optimizer`, `run_config`,
...); imports inside one part are free.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "cclm_jax"
ANYTHING = "*"

# part -> the other parts it may import. Each part may only use parts listed above it (the entry points, which
# use everything, aside), so no cycle can form.
ALLOWED: dict[str, frozenset[str] | str] = {
    "models": frozenset(),
    "torch": frozenset(),  # the PyTorch port of the model (independent of the JAX code)
    "data": frozenset(),
    "flops": frozenset({"models"}),
    "parallel": frozenset({"models"}),
    "train_state": frozenset({"models"}),
    "objectives": frozenset({"models"}),
    "checkpoint": frozenset({"train_state"}),
    # reading and writing official files and run directories: never the optimizer, the run configs or training
    "interop": frozenset({"models", "checkpoint", "train_state", "parallel"}),
    "optimizer": frozenset(),  # regex tables over Flax paths: no model or interop code
    "run_config": frozenset({"data", "models", "objectives", "parallel", "optimizer"}),
    # the fine-tuning task definitions (configs, models, losses, prediction, starting parameters)
    "tasks": frozenset({"models", "objectives", "data", "interop", "parallel", "optimizer"}),
    # metrics, retrieval, evaluators and reports: no training code, no run configs
    "evaluation": frozenset({"data", "models", "parallel", "objectives", "tasks", "interop"}),
    # embedding, scoring, index and search for users of a trained model (`cclm-jax index` / `search`)
    "inference": frozenset({"data", "models", "interop", "evaluation", "parallel", "checkpoint", "train_state"}),
    "train": ANYTHING,
    "aot": ANYTHING,  # `cclm-jax compile`: builds the trainer's programs for a topology
    "main": ANYTHING,
    "__main__": ANYTHING,
    "__init__": frozenset(),  # cclm_jax/__init__.py
}


def part_of(module: str) -> str | None:
    """`cclm_jax.a.b` -> `a`; None outside the package (and for the root package itself, which is empty)."""
    names = module.split(".")
    return names[1] if names[0] == "cclm_jax" and len(names) > 1 else None


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, package: str) -> set[str]:
    """Every module `source` imports, anywhere in the text (`from a import b` counts as `a` and `a.b`);
    `package`: the package relative imports start from."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return out


def imported_modules(path: pathlib.Path) -> set[str]:
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    return imports(path.read_text(), package)


def package_graph() -> dict[str, set[str]]:
    """part -> the other parts its modules import."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = part_of(module_name(path)) if path.parent != PACKAGE else path.stem
        targets = {part_of(m) for m in imported_modules(path)} - {None, source}
        graph.setdefault(source, set()).update(targets)
    return graph


def allowed_graph() -> dict[str, set[str]]:
    parts = set(ALLOWED)
    return {part: set(parts - {part}) if rule == ANYTHING else set(rule) for part, rule in ALLOWED.items()}


def test_every_part_is_in_the_table():
    unknown = sorted(set(package_graph()) - set(ALLOWED))
    assert not unknown, f"add {unknown} to ALLOWED in tests/test_layout.py (what may they import?)"


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_part_imports_only_what_it_may(part):
    graph = package_graph()
    if part not in graph:
        pytest.skip(f"cclm_jax has no {part}")
    if ALLOWED[part] == ANYTHING:
        return
    extra = sorted(graph[part] - ALLOWED[part])
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = part_of(module_name(path)) if path.parent != PACKAGE else path.stem
        if source == part:
            offenders += [f"{path.relative_to(PACKAGE.parent)}: {m}" for m in sorted(imported_modules(path))
                          if part_of(m) in extra]
    assert not extra, f"cclm_jax.{part} imports {extra}, which it may not:\n" + "\n".join(offenders)


def test_allowed_graph_has_no_cycle():
    """Every part may import only parts listed above it in ALLOWED (the entry points aside), so the allowed
    graph, and with it the package's, has no cycle."""
    order = list(ALLOWED)
    for part, rule in ALLOWED.items():
        if rule != ANYTHING:
            later = sorted(t for t in rule if t not in order or order.index(t) > order.index(part))
            assert not later, f"ALLOWED[{part!r}] names {later}, listed below it (or not at all)"


def test_function_local_and_relative_imports_count():
    source = "import os\n\ndef f():\n    from cclm_jax.train import steps\n    from . import text\n"
    found = imports(source, "cclm_jax.data")
    assert {"os", "cclm_jax.train", "cclm_jax.train.steps", "cclm_jax.data.text"} <= found
    assert {part_of(m) for m in found} - {None} == {"train", "data"}


if __name__ == "__main__":  # python tests/test_layout.py: the allowed graph and the package's own
    actual = package_graph()
    for name, rule in ALLOWED.items():
        allowed = "anything" if rule == ANYTHING else ", ".join(sorted(rule)) or "nothing"
        imported = ", ".join(sorted(actual.get(name, ()))) or "nothing"
        print(f"{name:12} may import {allowed:60} imports {imported}")


def test_the_train_step_path_imports_no_tensorflow():
    """Accelerator images may lack TensorFlow (the lent GPU's has none): the modules `benchmarks/train_step.py` and
    the jitted losses need (steps, objectives, models, optimizer, on-device normalisation) must not import it."""
    code = """
import sys
import cclm_jax.evaluation.retrieval, cclm_jax.optimizer, cclm_jax.parallel, cclm_jax.tasks.definitions
import cclm_jax.train_state
from cclm_jax.models import tiny_model_config
from cclm_jax.objectives import default_objectives_config
from cclm_jax.train.steps import StepConfig, view_loss_fn
view_loss_fn(StepConfig(tiny_model_config(), default_objectives_config()), ("image_caption",))
print("tensorflow" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "False"
