"""Import rules of the package, checked from the source with ``ast`` (nothing is imported).

* Data flows one way: data -> models -> diffusion / segmentation / inference -> train -> evaluation
  -> cli. No module below ``train/`` imports from it (sampling must not depend on training).
* ``runs/`` (run records, checkpoints, seeds, logs) sits below every stage that reads a run folder:
  it imports only ``data/``, ``models/``, ``errors``, ``device`` and the package root.
* No import cycle between modules of the package, counting imports inside functions too.
"""

from __future__ import annotations

import ast
import graphlib
import shutil
from pathlib import Path

import pytest

PACKAGE = "diffusiondci"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

#: folders that must never import from ``train/``
BELOW_TRAIN = ("data", "models", "diffusion", "segmentation", "inference", "runs")
#: what ``runs/`` may import (besides itself)
RUNS_MAY_IMPORT = ("data", "models", "errors", "device")


def module_names(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under the package folder ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that module ``name`` (file ``path``) imports, anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(dotted: str) -> None:
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):  # the longest prefix that is a module of ours
            candidate = ".".join(parts[:n])
            if candidate in known:
                found.add(candidate)
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # ``from pkg import module`` imports the module itself
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base)
    found.discard(name)
    return found


def import_graph(root: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    modules = module_names(root, package)
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]`` (None if there is none)."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        cycle = list(exc.args[1])
        return cycle[::-1]  # graphlib lists it against the edges; a imports b imports ... a
    return None


def in_folder(module: str, folder: str, package: str = PACKAGE) -> bool:
    prefix = f"{package}.{folder}"
    return module == prefix or module.startswith(prefix + ".")


def train_imports_below_train(graph: dict[str, set[str]], package: str = PACKAGE) -> list[str]:
    """``module -> train module`` for every import of ``train/`` from a folder below it."""
    return sorted(
        f"{mod} -> {dep}"
        for mod, deps in graph.items()
        if any(in_folder(mod, f, package) for f in BELOW_TRAIN)
        for dep in deps
        if in_folder(dep, "train", package)
    )


def runs_imports_above(graph: dict[str, set[str]], package: str = PACKAGE) -> list[str]:
    """``runs module -> module`` for every import from ``runs/`` of something it may not use."""
    allowed = ("runs", *RUNS_MAY_IMPORT)
    return sorted(
        f"{mod} -> {dep}"
        for mod, deps in graph.items()
        if in_folder(mod, "runs", package)
        for dep in deps
        if dep != package and not any(in_folder(dep, f, package) for f in allowed)
    )


def describe(cycle: list[str]) -> str:
    return " -> ".join(cycle)


# ------------------------------------------------------------------------------ the package


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert f"{PACKAGE}.cli" in graph and f"{PACKAGE}.train.loop" in graph
    assert f"{PACKAGE}.train.loop" in graph[f"{PACKAGE}.train.dsdm"]  # relative import resolved


def test_nothing_below_train_imports_train():
    bad = train_imports_below_train(import_graph())
    assert not bad, "modules below train/ import from it:\n  " + "\n  ".join(bad)


def test_runs_imports_only_what_lies_below_it():
    bad = runs_imports_above(import_graph())
    assert not bad, f"runs/ may import only {', '.join(RUNS_MAY_IMPORT)}:\n  " + "\n  ".join(bad)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {describe(cycle)}"


# ------------------------------------------------------------------------------ the checker can fail


def test_find_cycle_on_small_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    cycle = find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    for x, y in zip(cycle, cycle[1:]):  # each step follows an import
        assert y in {"a": {"b"}, "b": {"c"}, "c": {"a"}}[x]


def test_checker_catches_bad_modules(tmp_path):
    root = tmp_path / PACKAGE
    shutil.copytree(SRC, root, ignore=shutil.ignore_patterns("__pycache__"))
    assert find_cycle(import_graph(root)) is None
    assert not train_imports_below_train(import_graph(root))

    # a relative import of train/ from diffusion/, inside a function
    (root / "diffusion" / "bad_sampling.py").write_text(
        "def f():\n    from ..train.loop import Trainer\n    return Trainer\n"
    )
    # an absolute one from runs/ (also above what runs/ may import)
    (root / "runs" / "bad_record.py").write_text("import diffusiondci.train.dsdm\n")
    # a two-module cycle through ``from . import name``
    (root / "models" / "ping.py").write_text("from . import pong\n")
    (root / "models" / "pong.py").write_text("from .ping import x\n")
    graph = import_graph(root)

    assert train_imports_below_train(graph) == [
        f"{PACKAGE}.diffusion.bad_sampling -> {PACKAGE}.train.loop",
        f"{PACKAGE}.runs.bad_record -> {PACKAGE}.train.dsdm",
    ]
    assert runs_imports_above(graph) == [f"{PACKAGE}.runs.bad_record -> {PACKAGE}.train.dsdm"]
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {f"{PACKAGE}.models.ping", f"{PACKAGE}.models.pong"}
    with pytest.raises(AssertionError, match="import cycle: diffusiondci.models.p"):
        assert cycle is None, f"import cycle: {describe(cycle)}"
