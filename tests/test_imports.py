"""Every module of the package imports, and the import graph has no circle.

The graph is read from the source with `ast` over the folders `pyproject.toml` maps to the
package (`nlbench/`, `tasks/` = nlbench.tasks, `baselines/` = nlbench.baselines). It counts
every `import` / `from … import` statement anywhere in a module: at module level and inside
functions too, because an import deferred into a function to dodge an import-time error
still ties the two modules into one unit that cannot be read or changed apart. An edge goes
to the most specific module named (`from a.b import c` is an edge to a.b.c when c is a
module, else to a.b). A package is not counted as imported by its own submodules merely
because Python runs its `__init__` first: a facade `__init__` that re-exports its
submodules is the layout, not a circle; a submodule that imports names from its own
package's `__init__` is an edge, and with such a facade, a circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """{package: folder} of the top-level packages, from pyproject's `package-dir` mapping."""
    cfg = tomllib.loads((root / "pyproject.toml").read_text())
    mapping = cfg["tool"]["setuptools"]["package-dir"]
    return {pkg: root / folder for pkg, folder in mapping.items()}


def module_files(dirs: dict[str, Path]) -> dict[str, Path]:
    """{module name: file} of every module under the mapped folders (a nested mapping wins)."""
    mods: dict[str, Path] = {}
    for pkg, folder in sorted(dirs.items(), key=lambda kv: kv[0].count(".")):
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join([pkg, *parts])] = path
    return mods


def _target(name: str, modules) -> str | None:
    """The longest known module that `name` (dotted) is, or lies in."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """{module: {imported module: line of the first such import}}, package modules only."""
    graph: dict[str, dict[str, int]] = {}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, up level - 1 more
                    base = (mod if is_pkg else mod.rpartition(".")[0]).split(".")
                    base = base[: len(base) - (node.level - 1)]
                    frm = ".".join(base + ([node.module] if node.module else []))
                else:
                    frm = node.module
                names = [f"{frm}.{a.name}" if f"{frm}.{a.name}" in modules else frm for a in node.names]
            for name in names:
                t = _target(name, modules)
                if t is not None and t != mod:
                    edges.setdefault(t, node.lineno)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one
    closed path through it: [a, b, …, a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth ≤ number of modules (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_closed_path(sorted(c), graph) for c in comps]


def _closed_path(comp: list[str], graph) -> list[str]:
    """A shortest cycle through comp[0] inside the component (breadth-first)."""
    inside, start = set(comp), comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]  # path: v, …, start
                if w in inside and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # unreachable for a component


def _describe(path: list[str], graph, modules) -> str:
    return "\n".join(f"  {a} -> {b}   ({modules[a].relative_to(ROOT)}:{graph[a][b]})" for a, b in zip(path, path[1:]))


def test_the_package_has_no_import_circle():
    modules = module_files(package_dirs())
    graph = import_graph(modules)
    found = cycles(graph)
    assert not found, "import circles (module-level and function-level imports):\n" + "\n\n".join(
        _describe(c, graph, modules) for c in found)


def test_the_graph_sees_the_imports_it_must():
    # a parser that found no edges would pass the test above: check edges that exist
    modules = module_files(package_dirs())
    assert {"nlbench.tasks.registry", "nlbench.baselines.titans", "nlbench.kernels.dgd.chunk"} <= set(modules)
    graph = import_graph(modules)
    assert "nlbench.kernels.dgd.solve" in graph["nlbench.kernels.dgd.chunk"]  # from a.b import names
    assert "nlbench.kernels.dgd.chunk" in graph["nlbench.kernels.dgd"]  # a facade importing its submodules
    assert "nlbench.kernels.titans" in graph["nlbench.baselines.titans"]  # across the package-dir mapping
    assert "nlbench.kernels.dgd.triton" in graph["nlbench.kernels.dgd"]  # inside a function


def test_a_planted_circle_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.a import f\n")  # facade: no circle by itself
    (pkg / "sub" / "a.py").write_text("from . import b\n\ndef f():\n    return b\n")
    (pkg / "sub" / "b.py").write_text("def g():\n    from pkg.sub.c import h\n    return h\n")  # function-level
    (pkg / "sub" / "c.py").write_text("from ..sub import a\nh = 1\n")  # relative, closes a -> b -> c -> a
    (pkg / "d.py").write_text("import pkg.sub.a\n")
    other = tmp_path / "other"  # a second mapped folder, like tasks/ = nlbench.tasks
    other.mkdir()
    (other / "__init__.py").write_text("")
    (other / "x.py").write_text("from pkg.other import y\n")
    (other / "y.py").write_text("from pkg.other.x import *\n")
    modules = module_files({"pkg": pkg, "pkg.other": other})
    found = cycles(import_graph(modules))
    assert sorted(found) == [["pkg.other.x", "pkg.other.y", "pkg.other.x"],
                             ["pkg.sub.a", "pkg.sub.b", "pkg.sub.c", "pkg.sub.a"]]


def test_every_module_imports():
    # one fresh interpreter (no test's imports or environment leak in), each module in turn
    names = sorted(module_files(package_dirs()))
    code = ("import importlib, sys, traceback\nbad = []\n"
            f"for name in {names!r}:\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception:\n        bad.append(name + ':\\n' + traceback.format_exc())\n"
            "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_package_is_listed_in_pyproject():
    # pyproject lists packages one by one (the package-dir mapping needs it): a sub-package left
    # out works in an editable checkout and is missing from a wheel
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(cfg["tool"]["setuptools"]["packages"])
    packages = {m for m, p in module_files(package_dirs()).items() if p.name == "__init__.py"}
    assert packages == listed, f"missing from pyproject: {sorted(packages - listed)}; listed, no package: {sorted(listed - packages)}"


def test_every_user_error_entry_names_a_class():
    # errors.USER_ERRORS names classes by string (importing them all would slow every command):
    # a module moved or renamed would silently turn its errors into tracebacks
    import importlib

    from nlbench.errors import USER_ERRORS

    for entry in USER_ERRORS:
        module, name = entry.split(":")
        cls = getattr(importlib.import_module(module), name, None)
        assert isinstance(cls, type) and issubclass(cls, Exception), entry
        assert cls.__module__ == module, f"{entry}: defined in {cls.__module__}"
