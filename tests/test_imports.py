"""The package's import graph, read from the source with `ast` (nothing is imported).

Imports point down (integration -> pipelines -> plugin -> pure-torch maths; data_prep imports no
training code), form no cycle, take no private (underscore) name from another module, and are
relative between the installed sub-packages, so a static tool resolves them to these folders.
The tests' own helpers module loads nothing but the standard library (checked in a fresh process).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("plugin", "pipelines", "data_prep")
# Run as a script by torchrun (its folder on sys.path), so it imports the installed package by name.
SCRIPTS = {"ogpsa.pipelines.integration.worker.ogpsa_lf_worker"}
MATHS = {"ogpsa.plugin.projection", "ogpsa.plugin.nullspace"}
# Entry points of the `ogpsa` command may start the integration layer above them.
ENTRIES = {"ogpsa.pipelines", "ogpsa.pipelines.cli"}
# Standard-library-only helpers that data_prep shares with the training side (one copy of each).
SHARED_WITH_DATA_PREP = {"ogpsa.plugin", "ogpsa.plugin.files"}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = ["ogpsa", *path.relative_to(ROOT).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


@functools.cache
def _imports(name: str, path: Path) -> list[tuple[str, list[str], int, int]]:
    """(imported module, names taken from it, relative level, line) of every import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], 0, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [a.name for a in node.names], node.level, node.lineno))
    return found


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, names, _, _ in _imports(name, path):
            if target in MODULES:
                graph[name].add(target)
            for n in names:  # `from . import dist`: the submodule
                if f"{target}.{n}" in MODULES:
                    graph[name].add(f"{target}.{n}")
    return graph


def test_the_graph_is_read():
    graph = _edges()
    assert "ogpsa.plugin.preflight" in graph["ogpsa.plugin.callback"]
    assert "ogpsa.plugin.projection" in graph["ogpsa.plugin.gradient_span"]
    assert "ogpsa.plugin.files" in graph["ogpsa.pipelines.recipe"]


def test_no_import_cycle():
    graph = _edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_private_name_crosses_a_module():
    bad = []
    for name, path in MODULES.items():
        for target, names, _, line in _imports(name, path):
            if not target.startswith("ogpsa") or target == name:
                continue
            bad += [f"{path.relative_to(ROOT)}:{line}: {target}.{n}" for n in names
                    if n.startswith("_") and f"{target}.{n}" not in MODULES]
            if any(part.startswith("_") and part != "__init__" for part in target.split(".")):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_imports_between_sub_packages_are_relative():
    absolute = [f"{path.relative_to(ROOT)}:{line}: {target}" for name, path in MODULES.items() if name not in SCRIPTS
                for target, _, level, line in _imports(name, path) if level == 0 and target.startswith("ogpsa")]
    assert not absolute, "absolute ogpsa imports (write them relative):\n" + "\n".join(absolute)


def test_imports_point_down():
    graph = _edges()
    for name, targets in graph.items():
        if name.startswith("ogpsa.data_prep"):
            assert all(t.startswith("ogpsa.data_prep") or t in SHARED_WITH_DATA_PREP for t in targets), (name, targets)
        if name.startswith("ogpsa.plugin"):
            assert all(t.startswith("ogpsa.plugin") for t in targets), (name, targets)
        if name in MATHS:
            assert not targets, (name, targets)
        if name.startswith("ogpsa.pipelines") and not name.startswith("ogpsa.pipelines.integration"):
            up = {t for t in targets if t.startswith("ogpsa.pipelines.integration")}
            assert not up or name in ENTRIES, (name, up)



def test_what_data_prep_shares_imports_only_the_standard_library():
    """data_prep imports no training code: what it takes from the plugin must not pull any in."""
    import sys

    for name in SHARED_WITH_DATA_PREP:
        for target, _, level, _ in _imports(name, MODULES[name]):
            top = target.split(".")[0]
            assert level == 0 and (top in sys.stdlib_module_names or top == "__future__"), (name, target)


def test_the_tests_helpers_import_only_the_standard_library():
    """tests/helpers.py is imported by conftest before any test module (conftest then sets the offline
    environment, OMP_NUM_THREADS among it, before torch loads) and by scripts torchrun starts from
    tests/: a plain Python process imports it, and it loads no third-party module."""
    import subprocess
    import sys

    def third_party(extra: str) -> set[str]:
        code = f"import sys; {extra}print(' '.join({{m.split('.')[0] for m in sys.modules}}))"
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        return set(proc.stdout.split()) - set(sys.stdlib_module_names)

    # what the interpreter's start loads anyway (site's .pth files: the activation hook, setuptools')
    assert third_party("import helpers; ") - third_party("") == {"helpers"}
