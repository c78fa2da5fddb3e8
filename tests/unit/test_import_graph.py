"""The import graph of ``appliance/`` and ``serving/``: no cycles, and layers that only point down.

(That ``serving/`` imports nothing of ``appliance/`` is tests/unit/test_layering.py's.)

Every ``import`` counts, at the top of a module or inside a function (an import
deferred into a function to hold a cycle apart is still a cycle); only imports
under ``if TYPE_CHECKING:`` are left out, since they never run. A package is
``appliance.<name>`` (a sub-package or a module of the root); ``serving`` is one.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.no_database

ROOT = Path(__file__).resolve().parents[2]
TOP = ("appliance", "serving")


def _modules() -> dict[str, Path]:
    mods = {}
    for top in TOP:
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST):
    """Every import statement in ``tree`` that runs, wherever it stands."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def module_graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for mod, path in mods.items():
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = ".".join(here[: len(here) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module or ""
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for name in names:
                target = _resolve(name, mods)
                if target and target != mod:
                    edges[mod].add(target)
    return edges


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "appliance" and len(parts) > 1 else parts[0]


def package_graph() -> dict[str, set[str]]:
    packages: dict[str, set[str]] = defaultdict(set)
    for src, targets in module_graph().items():
        for dst in targets:
            if package_of(src) != package_of(dst):
                packages[package_of(src)].add(package_of(dst))
    return packages


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    nodes = sorted(set(edges) | {t for ts in edges.values() for t in ts})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def _describe(component: list[str], edges: dict[str, set[str]]) -> str:
    inside = set(component)
    arrows = [f"{a} -> {b}" for a in component for b in sorted(edges.get(a, ())) if b in inside]
    return f"{' , '.join(component)}\n    " + "\n    ".join(arrows)


def test_the_graph_sees_deferred_imports():
    """The walk is not blind to imports inside functions (the way cycles used to hide)."""
    edges = module_graph()
    assert "appliance.training" in edges["appliance.jobs.tasks"]  # imported inside run_task
    assert "appliance.jobs.sandbox" in edges["appliance.jobs.ray_worker"]  # imported inside _run_rank


def test_no_module_imports_itself_through_others():
    edges = module_graph()
    found = cycles(edges)
    assert not found, "import cycles between modules:\n  " + "\n  ".join(_describe(c, edges) for c in found)


def test_no_package_imports_itself_through_others():
    edges = package_graph()
    found = cycles(edges)
    assert not found, "import cycles between packages:\n  " + "\n  ".join(_describe(c, edges) for c in found)


def test_only_the_wiring_imports_the_server_package():
    edges = module_graph()
    wrong = sorted(f"{a} -> {b}" for a, bs in edges.items() for b in bs
                   if package_of(b) == "appliance.server" and package_of(a) not in ("appliance.server", "appliance.cli"))
    assert not wrong, "appliance.server wires the app and is imported by nothing else:\n  " + "\n  ".join(wrong)


CONTROL_PLANE = ("appliance.server", "appliance.web", "appliance.portal", "appliance.identity", "appliance.files",
                 "appliance.catalog", "appliance.inference", "appliance.retention", "appliance.audit", "appliance.db",
                 "appliance.storage", "appliance.policy", "appliance.migrations", "appliance.models",
                 "appliance.jobs.scheduler", "appliance.jobs.service", "appliance.jobs.controllers",
                 "appliance.jobs.executors", "appliance.cli")


def test_the_ray_side_entry_point_imports_nothing_of_the_control_plane():
    """Everything ``python -m appliance.jobs.ray_worker`` can ever import, deferred imports included."""
    edges = module_graph()
    seen, todo = set(), ["appliance.jobs.ray_worker"]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(edges.get(mod, ()))
    wrong = sorted(m for m in seen if any(m == p or m.startswith(p + ".") for p in CONTROL_PLANE))
    assert not wrong, f"the Ray worker reaches control-plane modules: {wrong}"


#: The modules that may import every package's tables: the alembic environment's aggregate of them.
ALL_TABLES = ("appliance.models", "appliance.migrations")


def test_no_package_imports_another_packages_tables():
    """A package reaches another's tables through that package's service, never its ORM models."""
    edges = module_graph()
    wrong = sorted(f"{a} -> {b}" for a, bs in edges.items() for b in bs
                   if b.endswith(".models") and b.startswith("appliance.") and package_of(a) != package_of(b)
                   and package_of(a) not in ALL_TABLES and b != "appliance.models")
    assert not wrong, "imports of another package's ORM models:\n  " + "\n  ".join(wrong)
