"""What is installed: one package, gleaner, with every package folder listed; no top-level
`tasks` or `flows`; flows compose (short, no Prefect tasks of their own)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"gleaner": "gleaner", "gleaner.tasks": "tasks", "gleaner.flows": "flows"}


def package_folders() -> set[str]:
    found = set()
    for prefix, folder in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join([prefix, *parts]))
    return found


def test_every_package_folder_is_listed_in_pyproject() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(tool["packages"]) == package_folders()
    assert tool["package-dir"] == MAPPED


def test_no_module_imports_the_top_level_names() -> None:
    offenders = []
    for folder in ("gleaner", "tasks", "flows", "tests", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                    else [])
                if any(n.split(".")[0] in ("tasks", "flows") for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders


def flow_functions() -> list[tuple[str, ast.FunctionDef]]:
    out = []
    for path in (ROOT / "flows").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                out.append((path.name, node))
    return out


def _decorators(node: ast.FunctionDef) -> set[str]:
    names = set()
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        names.add(target.id if isinstance(target, ast.Name) else getattr(target, "attr", ""))
    return names


def test_flows_compose_and_define_no_prefect_task() -> None:
    flows = [(file, fn) for file, fn in flow_functions() if "flow" in _decorators(fn)]
    assert len(flows) >= 8
    assert not [f"{file}:{fn.name}" for file, fn in flow_functions() if "task" in _decorators(fn)]
    long = [f"{file}:{fn.name} ({fn.end_lineno - fn.lineno + 1} lines)" for file, fn in flows
            if fn.end_lineno - fn.lineno + 1 > 60]
    assert not long


def test_the_wheel_holds_gleaner_only(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: setuptools writes build/ beside the sources
    for name in ("gleaner", "tasks", "flows"):
        shutil.copytree(ROOT / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "wheel"), str(source)], check=True,
                   capture_output=True)
    [wheel] = (tmp_path / "wheel").glob("gleaner-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"gleaner"}
    assert "gleaner/tasks/rate/stage.py" in names and "gleaner/flows/curate.py" in names
    assert "gleaner/engine/runner.py" in names
