"""Refresh the lock: resolve gleaner's ranges anew and pin what pip picks.

    python3 infra/lock/refresh.py            # rewrites infra/lock/constraints.txt

pip resolves ``.[dev,local-llm]`` without installing anything (``--dry-run
--report``; llama-cpp-python's metadata comes from its sdist without a
compile) and every package it would install is pinned with ``==``. Run it on
Linux with Python 3.11, then run ``infra/install.sh`` and the tests before
committing the new lock: the lock is only worth what was tested with it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "infra" / "lock" / "constraints.txt"
EXTRAS = "dev,local-llm"
# Packaging tools the venv needs too; pip leaves them out of a dry-run report.
TOOLS = ("pip", "setuptools", "wheel")
HEADER = """\
# gleaner's lock: the exact versions CI installs and tests (pip constraints file).
# Used by infra/install.sh (pip install -c ...). Refresh: python3 infra/lock/refresh.py
# pyproject.toml keeps ranges for people who install gleaner as a library.
# torch is written without its local label (2.13.0, not 2.13.0+cpu): the pin then matches
# the CPU build on this project's machines and PyPI's build elsewhere.
"""


def resolve() -> dict[str, str]:
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
             "--quiet", "--report", str(report), f"{ROOT}[{EXTRAS}]"],
            check=True,
        )
        document = json.loads(report.read_text())
    pins: dict[str, str] = {}
    for item in document["install"]:
        name = item["metadata"]["name"]
        if name.lower() == "gleaner":
            continue
        pins[canonical(name)] = item["metadata"]["version"].split("+", 1)[0]
    for tool in TOOLS:
        version = subprocess.run(
            [sys.executable, "-c", f"import importlib.metadata as m; print(m.version({tool!r}))"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        pins.setdefault(tool, version)
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> None:
    pins = resolve()
    LOCK.write_text(HEADER + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    print(f"wrote {len(pins)} pins to {LOCK.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
