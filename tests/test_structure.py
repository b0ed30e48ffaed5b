"""The package's shape, read from its source with ``ast`` (nothing imported, milliseconds):

(a) no import cycles, neither between files nor between rooms (a room is the first component under
    ``taskvec_interp``: ``adapters``, ``tasks``, ``probes``, ``experiments``, ``synthetic``, ``figures``,
    ``engine``, ``hooks``, ...; a package's ``__init__`` belongs to its room, the top-level
    ``taskvec_interp/__init__.py`` is the room ``__init__``). Runtime imports only: the bodies of
    ``if TYPE_CHECKING:`` are skipped; imports inside functions count (they run, only later). An import
    names the module it imports (``from taskvec_interp.adapters import base`` -> ``adapters/base.py``;
    ``from taskvec_interp.adapters import load_model`` -> ``adapters/__init__.py``); the parents Python
    runs on the way are not counted, so a package's ``__init__`` importing its own submodules is no circle.
(b) no module over :data:`MAX_LINES` lines.
(c) every module with behaviour (a function or class of its own) is imported by some ``tests/test_*.py``,
    by its name or through a name its package re-exports from it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "taskvec_interp"
SRC = ROOT / PACKAGE
TESTS = ROOT / "tests"
MAX_LINES = 800


# --------------------------------------------------------------------------------------------------
# reading the source
# --------------------------------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    """``taskvec_interp.x.y`` -> its file, for every ``.py`` under the package."""
    return {module_name(p): p for p in sorted(SRC.rglob("*.py")) if "__pycache__" not in p.parts}


MODULES = package_modules()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom | ast.Call]:
    """Every import statement that can run (any depth, ``if TYPE_CHECKING:`` bodies skipped), and calls
    ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name."""
    found: list = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name) and node.func.id == "__import__")
                   or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"))):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _resolve_from(node: ast.ImportFrom, importer: str, importer_is_package: bool) -> str | None:
    if not node.level:
        return node.module
    base = importer.split(".")
    if not importer_is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(tree: ast.AST, importer: str, importer_is_package: bool) -> set[str]:
    """The modules of the package that ``tree`` imports by name (see the module docstring)."""
    out: set[str] = set()

    def add(name: str | None) -> None:
        # the longest prefix of ``name`` that is a module of the package
        parts = (name or "").split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in MODULES:
                out.add(candidate)
                return
            parts.pop()

    for node in runtime_import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, importer, importer_is_package)
            if not base or not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # ``from pkg import submodule``
                    out.add(sub)
                else:  # a name defined in (or re-exported by) ``base``
                    add(base)
        else:
            add(node.args[0].value)
    out.discard(importer)
    return {m for m in out if m == PACKAGE or m.startswith(PACKAGE + ".")}


def file_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = imported_modules(tree, name, is_package(name))
    return graph


def room(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def room_graph(files: dict[str, set[str]]) -> tuple[dict[str, set[str]], dict[tuple[str, str], list[str]]]:
    """Rooms and their imports, with (room, room) -> the file imports behind that edge."""
    graph: dict[str, set[str]] = defaultdict(set)
    why: dict[tuple[str, str], list[str]] = defaultdict(list)
    for src, targets in files.items():
        graph[room(src)]
        for dst in targets:
            a, b = room(src), room(dst)
            if a != b:
                graph[a].add(b)
                why[(a, b)].append(f"{src} -> {dst}")
    return dict(graph), dict(why)


# --------------------------------------------------------------------------------------------------
# cycles
# --------------------------------------------------------------------------------------------------


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out)


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest circle through the component's first node (a -> b -> ... -> a)."""
    members, start = set(component), component[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in prev:
                    prev[child] = node
                    nxt.append(child)
        frontier = nxt
    return component


def describe_cycles(graph: dict[str, set[str]], why: dict | None = None) -> list[str]:
    lines = []
    for comp in strongly_connected(graph):
        circle = a_cycle(graph, comp)
        line = f"{' -> '.join(circle)}   (all of: {', '.join(comp)})"
        if why is not None:
            line += "".join(f"\n      {a} -> {b}: {'; '.join(why[(a, b)][:4])}"
                            for a, b in zip(circle, circle[1:], strict=False))
        lines.append(line)
    return lines


# --------------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------------


def test_the_reader_sees_the_package():
    """A parser that found nothing would pass every test below."""
    assert f"{PACKAGE}.hooks" in MODULES and f"{PACKAGE}.adapters.base" in MODULES, sorted(MODULES)
    files = file_graph()
    assert f"{PACKAGE}.adapters.base" in files[f"{PACKAGE}.adapters"]  # the __init__ imports its submodules
    assert sum(map(len, files.values())) > len(MODULES)


def test_cycle_finder_on_known_graphs():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert strongly_connected(graph) == [["a", "b", "c"], ["e", "f"]]
    assert a_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_runtime_imports_skip_type_checking_and_count_function_level():
    src = """
from __future__ import annotations
from typing import TYPE_CHECKING
import numpy
import taskvec_interp.hooks
if TYPE_CHECKING:
    from taskvec_interp.adapters import base
else:
    from taskvec_interp import validate
def f():
    from ..tasks import pos
    from .decodability import task_decodability
    return importlib.import_module("taskvec_interp.engine")
"""
    got = imported_modules(ast.parse(src), f"{PACKAGE}.probes.vectors", False)
    assert got == {f"{PACKAGE}.{m}" for m in ("hooks", "validate", "tasks.pos", "probes.decodability", "engine")}
    # from a package's __init__, "." is the package itself
    got = imported_modules(ast.parse("from .base import Adapter\nfrom . import load"), f"{PACKAGE}.adapters", True)
    assert got == {f"{PACKAGE}.adapters.base", f"{PACKAGE}.adapters.load"}


def test_no_import_cycle_between_files():
    cycles = describe_cycles(file_graph())
    assert not cycles, f"{len(cycles)} circle(s) of imports between files:\n  " + "\n  ".join(cycles)


def test_no_import_cycle_between_rooms():
    graph, why = room_graph(file_graph())
    cycles = describe_cycles(graph, why)
    assert not cycles, f"{len(cycles)} circle(s) of imports between rooms:\n  " + "\n  ".join(cycles)


def test_no_module_over_max_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def has_behaviour(path: Path) -> bool:
    """A function or class defined in the module itself (not only imports, constants, ``__all__``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for n in tree.body)


_REEXPORTS: dict[str, dict[str, str]] = {}


def reexports(module: str) -> dict[str, str]:
    """Names a module imports from another module of the package (``from .base import Adapter`` in
    ``adapters/__init__``: Adapter -> adapters.base), followed through chains of re-exports (memoised)."""
    if module in _REEXPORTS:
        return _REEXPORTS[module]
    _REEXPORTS[module] = {}  # in progress: a circle of re-exports stops here
    if module not in MODULES:
        return {}
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out = {}
    for node in runtime_import_nodes(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = _resolve_from(node, module, is_package(module))
        if base not in MODULES:
            continue
        deeper = reexports(base)
        for alias in node.names:
            if f"{base}.{alias.name}" not in MODULES:
                out[alias.asname or alias.name] = deeper.get(alias.name, base)
    _REEXPORTS[module] = out
    return out


def modules_under_test() -> dict[str, list[str]]:
    """Package module -> the test files importing it: by its name, or a name its package re-exports from it
    (``from taskvec_interp.adapters import TorchHooksAdapter``, or ``from taskvec_interp import tasks as T``
    then ``T.bitwise_family``, count for the module that defines the name)."""
    out: dict[str, list[str]] = defaultdict(list)
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found = imported_modules(tree, "tests." + path.stem, False)
        aliases: dict[str, str] = {}  # local name -> package module it is bound to
        for node in runtime_import_nodes(tree):
            if isinstance(node, ast.Import):
                aliases |= {a.asname: a.name for a in node.names if a.asname and a.name in MODULES}
            elif isinstance(node, ast.ImportFrom) and node.module in MODULES and not node.level:
                names = reexports(node.module)
                found |= {names[a.name] for a in node.names if a.name in names}
                aliases |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                            if f"{node.module}.{a.name}" in MODULES}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                names = reexports(aliases[node.value.id])
                if node.attr in names:
                    found.add(names[node.attr])
        for mod in found:
            out[mod].append(path.name)
    return out


def test_every_module_with_behaviour_has_a_test_module():
    tested = modules_under_test()
    missing = sorted(str(p.relative_to(ROOT)) for name, p in MODULES.items()
                     if has_behaviour(p) and name not in tested)
    assert not missing, ("modules with behaviour that no tests/test_*.py imports (by name or through a "
                         "re-export of its package):\n  "
                         + "\n  ".join(missing))


def test_the_slow_list_names_existing_tests():
    """conftest.SLOW_TESTS picks the slow tier by name: a renamed test would silently join the fast tier."""
    from conftest import SLOW_TESTS

    stale = []
    for key in SLOW_TESTS:
        file, name = key.split("::")
        path = TESTS / file
        tree = ast.parse(path.read_text(encoding="utf-8")) if path.exists() else ast.Module(body=[], type_ignores=[])
        if not any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body):
            stale.append(key)
    assert not stale, f"conftest.SLOW_TESTS names tests that do not exist: {stale}"
