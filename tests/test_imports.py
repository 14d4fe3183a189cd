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
MATHS = {"ogpsa.plugin.methods.gradient_span.maths", "ogpsa.plugin.methods.null_space.maths"}
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
    assert "ogpsa.plugin.methods.gradient_span.maths" in graph["ogpsa.plugin.methods.gradient_span.method"]
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


# ---- the benchmark package (benchmarks/ogpsa_bench, not installed) ----------------------------------
BENCH = ROOT / "benchmarks" / "ogpsa_bench"
# Its modules by layer, top first: a module imports only modules of layers below its own.
BENCH_LAYERS = [{"__main__"}, {"cli"}, {"loop"}, {"instrument"}, {"assets", "copycheck", "summary"}, {"device"},
                {"__init__"}]


def _bench_modules() -> dict[str, Path]:
    return {path.stem: path for path in sorted(BENCH.glob("*.py"))}


def _layer(module: str) -> int:
    return next(i for i, layer in enumerate(BENCH_LAYERS) if module in layer)


def test_benchmark_modules_each_have_a_layer_and_import_down():
    modules = _bench_modules()
    assert set(modules) == set().union(*BENCH_LAYERS), "place every module of ogpsa_bench in BENCH_LAYERS"
    bad = []
    for name, path in modules.items():
        for target, names, level, line in _imports(f"ogpsa_bench.{name}", path):
            if level == 0:
                assert not target.startswith("ogpsa_bench"), f"{path.name}:{line}: import the package's modules relatively"
                continue
            local = [target.split(".")[1]] if "." in target else [n for n in names if n in modules]
            bad += [f"{path.name}:{line}: {name} -> {m}" for m in local if _layer(m) <= _layer(name)]
    assert not bad, "imports that do not point down:\n" + "\n".join(bad)


def test_benchmark_uses_public_names_and_patches_nothing_of_the_plugin():
    """No private name imported or read across modules (an object's own `self._x` aside), and nothing
    imported from `ogpsa` assigned to or patched: the timing goes through the constraint interface."""
    bad = []
    for name, path in _bench_modules().items():
        tree = ast.parse(path.read_text(), str(path))
        for target, names, _, line in _imports(f"ogpsa_bench.{name}", path):
            if any(p.startswith("_") and p not in ("__future__", "__init__") for p in target.split(".")):
                bad.append(f"{path.name}:{line}: {target}")
            bad += [f"{path.name}:{line}: {target}.{n}" for n in names if n.startswith("_")]
        plugin_names = set()  # what names the plugin's modules and objects here
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                plugin_names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("ogpsa.")}
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("ogpsa."):
                plugin_names |= {a.asname or a.name for a in node.names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.endswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                bad.append(f"{path.name}:{node.lineno}: reads private .{node.attr}")
            changed = []  # (what is changed, whether the expression itself is changed or a member of it)
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
                changed = [(t, False) for t in (node.targets if isinstance(node, (ast.Assign, ast.Delete))
                                                else [node.target])]
            elif isinstance(node, ast.Call) and (getattr(node.func, "id", None) in ("setattr", "delattr")
                                                 or getattr(node.func, "attr", None) in ("patch", "object")):
                changed = [(t, True) for t in node.args[:1]]  # setattr(x, ...), mock.patch("x.y"), patch.object(x, ...)
            for t, itself in changed:
                root = t
                while isinstance(root, (ast.Attribute, ast.Subscript)):
                    root = root.value
                if isinstance(root, ast.Constant):
                    hit = str(root.value).startswith("ogpsa.")
                else:
                    hit = getattr(root, "id", None) in plugin_names and (itself or t is not root)
                if hit:
                    bad.append(f"{path.name}:{node.lineno}: changes {ast.unparse(t)}")
    assert not bad, "the benchmark reaches into private or patched code:\n" + "\n".join(bad)


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
