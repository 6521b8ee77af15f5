"""The layers stay apart: the shared layer (gleaner/) imports no stage and no flow, not even
inside a function or by a module name in a string; stages (tasks/) import the shared layer
and each other, never a flow; flows and bench sit on top. The registries learn their built-in
modules from pyproject's ``gleaner.builtins`` entry points, so no string in gleaner/ names one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = re.compile(r"^gleaner\.(tasks|flows)(\.|$)")


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are docstrings (module, class, function)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports or names in a string (docstrings aside), with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = docstrings(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
            if node.module == "gleaner":
                found += [(node.lineno, f"gleaner.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in skip and MODULE.match(node.value)):
            found.append((node.lineno, node.value))
    return found


def violations(folder: str, forbidden: re.Pattern[str]) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} {name}"
            for path in sorted((ROOT / folder).rglob("*.py"))
            for line, name in imports_of(path) if forbidden.match(name)]


def test_the_shared_layer_imports_no_stage_and_no_flow() -> None:
    assert violations("gleaner", MODULE) == []


def test_stages_import_no_flow() -> None:
    assert violations("tasks", re.compile(r"^gleaner\.flows(\.|$)")) == []


def test_the_check_sees_imports_inside_functions_and_module_names_in_strings(tmp_path: Path
                                                                              ) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('"""Docstrings may name gleaner.tasks.rate."""\n'
                      "def late():\n    from gleaner.tasks.rate import stage\n"
                      'BUILT = ("gleaner.flows.cli",)\n'
                      "from gleaner import flows\n")
    assert sorted(name for _, name in imports_of(sample) if MODULE.match(name)) == [
        "gleaner.flows", "gleaner.flows.cli", "gleaner.tasks.rate"]


def test_every_registry_kind_has_its_builtins_declared() -> None:
    import importlib.metadata

    from gleaner.registry import registry

    declared = {e.name: e.value for e in importlib.metadata.entry_points(
        group="gleaner.builtins")}
    kinds = {name.split(".")[0] for name in declared}
    assert kinds >= {"selector", "signal", "rater", "scorer", "generation_backend",
                     "eval_set", "export_format", "response_source", "offline_role",
                     "planned_stage"}
    for name, module in declared.items():
        assert module.startswith("gleaner.tasks."), (name, module)
    for kind in kinds:
        assert registry(kind).names(), kind  # importing the modules registered entries
    assert {"generator", "grader", "judge", "rater", "rewriter", "teacher", "tagger"} <= set(
        registry("offline_role").names())
