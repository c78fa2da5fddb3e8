"""Layering rules, checked on the source (issue 18, item 3).

1. ``serving/`` imports nothing from ``appliance/`` (the appliance may import serving).
2. Error bodies (``{"error": ...}``) are built in one place, :func:`serving.errors.error_body`
   (and vLLM's 401 body next to it); the control plane's one handler and the standalone
   vLLM-compatible server both call it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVING = ROOT / "serving"
APPLIANCE = ROOT / "appliance"

#: The only module allowed to build an error body.
BODY_BUILDER = SERVING / "errors.py"


def _sources(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """Every imported module name with its line, in functions too; not under ``if TYPE_CHECKING:``."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the ``else`` branch runs
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and _dynamic_import(node):
            found.append((node.lineno, node.args[0].value))  # type: ignore[attr-defined]
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _dynamic_import(node: ast.Call) -> bool:
    """``importlib.import_module("x")`` / ``__import__("x")`` with a literal name."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return (name in ("import_module", "__import__") and bool(node.args)
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


def test_serving_imports_nothing_from_appliance() -> None:
    offending = [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for path in _sources(SERVING)
        for line, module in _imports(ast.parse(path.read_text(), filename=str(path)))
        if module == "appliance" or module.startswith("appliance.")
    ]
    assert not offending, "serving/ must not import from appliance/:\n" + "\n".join(offending)


def _error_bodies(tree: ast.AST) -> list[int]:
    """Lines building an error body by hand. What counts:

    - a dict literal whose only key is the string ``"error"`` (``{"error": {...}}``,
      ``{"error": "Unauthorized"}``): the envelope of OpenAI's and vLLM's error bodies.
      Dicts with more keys (log ``extra=``, status reports with an ``"error"`` field,
      worker frames ``{"type": "error", ...}``) are not error bodies and do not count;
    - ``dict(error=...)``, the same envelope built by a call;
    - ``body["error"] = ...``, the envelope built by item assignment (adding a field inside it,
      ``body["error"]["scan"] = ...``, is not building one).
    """
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict) and len(node.keys) == 1:
            key = node.keys[0]
            if isinstance(key, ast.Constant) and key.value == "error":
                lines.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict"
              and any(k.arg == "error" for k in node.keywords)):
            lines.append(node.lineno)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant) and t.slice.value == "error"
                   for t in targets):
                lines.append(node.lineno)
    return lines


def test_error_bodies_are_built_in_one_place() -> None:
    offending = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in _sources(APPLIANCE, SERVING)
        if path != BODY_BUILDER
        for line in _error_bodies(ast.parse(path.read_text(), filename=str(path)))
    ]
    assert not offending, ("error bodies must come from serving.errors.error_body (through the control plane's "
                           "handler, appliance.server.errors); built by hand at:\n" + "\n".join(offending))


@pytest.mark.parametrize("source, expected", [
    ('return {"error": {"message": m, "type": t, "param": None, "code": 400}}', [1]),
    ('return Response({"error": "Unauthorized"}, status_code=401)', [1]),
    ("body = dict(error=dict(code=c))", [1]),
    ('log.info("x", extra={"adapter": name, "error": exc.message})', []),
    ('frame = {"type": "error", "code": c, "message": m, "param": None}', []),
    ('status = {"up": up, "error": err}', []),
    ('body = {}\nbody["error"] = {"code": c}', [2]),
    ('body["error"]["scan"] = details', []),
])
def test_the_body_pattern_catches_bodies_only(source: str, expected: list[int]) -> None:
    assert _error_bodies(ast.parse(source)) == expected


def test_the_import_scan_sees_function_level_imports_but_not_type_checking_ones() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from appliance.settings import Settings\n"
        "def f():\n"
        "    from appliance.errors import X\n"
        "    import appliance.logs\n"
        "    return importlib.import_module('appliance.db')\n"
    )
    assert [m for _, m in _imports(tree) if m.startswith("appliance")] == [
        "appliance.errors", "appliance.logs", "appliance.db"]
