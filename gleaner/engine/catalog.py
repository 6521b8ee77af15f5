"""Stages a run's pool can be given by name: a registry (``pool_stage``).

A stage that makes a per-example signal registers itself here once, and is then reachable
everywhere a pool stage is: its own CLI verb (``gleaner <verb> --run-id ID``), ``curate``
(``curate.signals``), the experiment grid (when an arm's selector reads its signal) and the
cost plan. The flows run it on the engine with gleaner's offline server taking its roles
when they have no endpoint.

A stage may also *mark examples to drop* (:class:`Drop`: decontamination, near-duplicate
removal): selection then gives every marked example the drop's manifest reason before any
selector runs, so a marked example is never selected and the counts per reason still add
up to the pool (``select.drop_marked``). A stage with a global step after its batches (the
near-duplicate clustering) names it as ``finish``; a stage with switches of its own beyond
the engine's names them as ``flags`` (its CLI verb gets them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gleaner.config import GleanerConfig
from gleaner.engine.stage import Stage
from gleaner.registry import registry


@dataclass(frozen=True)
class Drop:
    """Examples a stage marks to leave out of every selection."""

    stage: str  # the stage (folder) whose rows hold the mark
    column: str  # a boolean column: true = leave the example out
    reason: str  # the manifest reason of a marked example (its counts row in the report)
    detail: str | None = None  # a column whose value follows the reason: ``reason:<value>``


@dataclass(frozen=True)
class StageFlag:
    """A CLI flag of a pool stage's verb, set as one config key (None: as configured)."""

    flag: str  # e.g. "--ngram"
    key: str  # the dotted config key it sets
    type: type  # str, int, float (a str flag may be given several times: a list)
    help: str
    many: bool = False  # a list: repeated and/or comma-separated values


@dataclass(frozen=True)
class PoolStage:
    """How a registered stage is made from a config, and how it presents itself."""

    make: Callable[[GleanerConfig], Stage]
    section: str  # its config section (CLI flags map onto it)
    verb: str  # its CLI verb
    help: str  # the verb's one-line help
    panel: str = "Judge it"  # where `gleaner --help` lists it
    roles: tuple[str, ...] = ()  # offline roles (gleaner.llm.offline) it may need
    describe: Callable[[Mapping[str, Any]], str] = lambda summary: (
        f"{summary.get('ok', 0):,} ok, {summary.get('failed', 0):,} failed")
    drop: Drop | None = None  # the examples it marks are left out of selection
    # a global step after the batches: (config, run_id, the engine's summary) -> the summary
    finish: Callable[[GleanerConfig, str, dict[str, Any]], dict[str, Any]] | None = None
    flags: tuple[StageFlag, ...] = ()  # its own CLI flags (an LLM stage: --base-url, --model)


def pool_stage(name: str) -> PoolStage:
    return registry("pool_stage").get(name)


def pool_stages() -> dict[str, PoolStage]:
    return dict(registry("pool_stage").items())


def drops() -> list[Drop]:
    """What the registered pool stages mark to leave out of selection, in registry order."""
    return [entry.drop for entry in pool_stages().values() if entry.drop is not None]
