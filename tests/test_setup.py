"""The README's set-up command is what CI runs, it installs the lock's versions, and it builds
llama.cpp so that it runs on any CPU: no native flags, and no natively built wheel reused."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "infra" / "lock" / "constraints.txt"


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, re.S)


def setup_command() -> str:
    """The README's first command: set up, then run the main job."""
    first = readme_commands()[0]
    setup, _, main_job = first.partition(" && ")
    assert main_job.startswith(".venv/bin/gleaner curate"), first
    return setup


def executed_lines(script: Path) -> list[str]:
    return [line.strip() for line in script.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_ci_runs_the_readmes_setup_command_and_its_test_command() -> None:
    lines = executed_lines(ROOT / ".ci" / "run")
    assert setup_command() in lines  # the same command, not a copy of what it does
    assert not any("pip install" in line for line in lines)
    test_command = readme_commands()[1].strip()
    assert test_command == ".venv/bin/python -m pytest"
    assert test_command in lines
    assert f"{test_command} -m timing -n 0" in lines  # what the default leaves out: rates
    assert f"{test_command} -m e2e" in lines  # ... and the whole-product runs


def test_setup_installs_from_the_lock_with_a_portable_llama_cpp() -> None:
    script = (ROOT / setup_command()).read_text()
    assert 'LOCK="infra/lock/constraints.txt"' in script
    commands = [line.strip() for line in script.replace("\\\n", " ").splitlines()
                if not line.strip().startswith("#")]
    installs = [line for line in commands if "pip install" in line or "pip wheel" in line]
    assert installs and all('-c "$LOCK"' in line or "--force-reinstall" in line
                            for line in installs)
    code = "\n".join(commands)
    assert "--only-binary llama-cpp-python" in code  # never a wheel from pip's own cache
    assert "--no-cache-dir --no-binary llama-cpp-python" in code
    assert "-DGGML_NATIVE=OFF" in code and "-march=native" not in code
    assert "-DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON" in code
    assert "CMAKE_INSTALL_BINDIR=llama_cpp/lib" in code  # variants beside libggml
    assert "gleaner.llm.llama_build --check" in code


def test_the_lock_pins_every_dependency_and_pyproject_keeps_ranges() -> None:
    pins = dict(line.split("==", 1) for line in LOCK.read_text().splitlines()
                if line and not line.startswith("#"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # every extra the set-up command installs; the `gpu` extra (CUDA builds) is not locked
    declared = project["dependencies"] + [d for name, extra in project["optional-dependencies"]
                                          .items() if name != "gpu" for d in extra]
    for requirement in declared:
        name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pins, f"{name} is not in the lock"
        if name != "torch":  # the CPU build on local disk is asked for by version
            assert "==" not in requirement, requirement
    assert pins["torch"] == "2.13.0" and "+" not in pins["torch"]
    assert set(project["optional-dependencies"]) == {"dev", "local-llm", "gpu"}
    assert {"pip", "setuptools", "wheel", "llama-cpp-python"} <= set(pins)


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_the_setup_command_builds_a_fresh_environment(tmp_path: Path) -> None:
    """A new virtualenv through the README's command: the lock's versions, the portable wheel
    (reused from the wheelhouse when CI has built it; built otherwise), a CPU variant that
    runs here."""
    venv = tmp_path / "venv"
    env = {**os.environ, "GLEANER_VENV": str(venv), "GLEANER_EXTRAS": "local-llm"}
    result = subprocess.run(shlex.split(setup_command()), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1700)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "llama.cpp on " in result.stdout and "CPU variant" in result.stdout
    pins = dict(line.split("==", 1) for line in LOCK.read_text().splitlines()
                if line and not line.startswith("#"))
    # pip list, not freeze: a wheel installed from the wheelhouse freezes as "name @ file://"
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list",
                             "--format=json"], capture_output=True, text=True, check=True).stdout
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listed)}
    for name in ("prefect", "ray", "openai", "transformers", "pyarrow", "llama-cpp-python"):
        assert installed[name] == pins[name], name
    lib = next(venv.glob("lib/python3*/site-packages/llama_cpp/lib"))
    assert len(list(lib.glob("libggml-cpu-*.so"))) >= 2  # the runtime-dispatch build
