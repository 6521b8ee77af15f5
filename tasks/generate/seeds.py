"""Seed tasks: Alpaca's ``seed_tasks.jsonl`` (175 human-written tasks), read as Alpaca read it.

Each line holds ``instruction`` and ``instances``; Alpaca took the first instance's ``input``
and ``output`` (``generate_instruction.py``). A line that does not fit stops the run, naming
the file and the line: a seed file is small and hand-made, so a silent skip would hide a typo.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gleaner.jsonl import json_lines


class SeedError(ValueError):
    """The seed file cannot be read as seed tasks."""


@dataclass(frozen=True)
class Task:
    """One (instruction, input, output) task: a seed, or one the generator kept."""

    instruction: str
    input: str
    output: str


def _task(document: Any, where: str) -> Task:
    if not isinstance(document, dict):
        raise SeedError(f"{where}: expected a JSON object")
    instruction = document.get("instruction")
    instances = document.get("instances")
    if not isinstance(instruction, str) or not instruction.strip():
        raise SeedError(f"{where}: no 'instruction' text")
    if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
        raise SeedError(f"{where}: no 'instances' list with an input/output object")
    first = instances[0]
    values = [first.get("input", ""), first.get("output", "")]
    if not all(isinstance(v, str) for v in values):
        raise SeedError(f"{where}: the first instance's 'input' and 'output' must be text")
    return Task(instruction, values[0], values[1])


def load_seed_tasks(url: str, storage_options: dict[str, Any] | None = None,
                    minimum: int = 1) -> list[Task]:
    """The seed tasks of a JSONL file (any fsspec URL), in file order."""
    tasks = [_task(document, where) for _, where, document in
             json_lines(url, SeedError, "seed file", storage_options)]
    if len(tasks) < minimum:
        raise SeedError(f"{url} holds {len(tasks)} seed task(s); each request shows {minimum}")
    return tasks


def seeds_fingerprint(tasks: Sequence[Task]) -> str:
    """Changes when any seed changes: a run's pool grows from exactly these seeds."""
    blob = json.dumps([[t.instruction, t.input, t.output] for t in tasks], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
