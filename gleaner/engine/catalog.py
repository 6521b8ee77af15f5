"""Stages a run's pool can be given by name: a registry (``pool_stage``).

A stage that makes a per-example signal registers itself here once, and is then reachable
everywhere a pool stage is: its own CLI verb (``gleaner <verb> --run-id ID``), ``curate``
(``curate.signals``), the experiment grid (when an arm's selector reads its signal) and the
cost plan. The flows run it on the engine with gleaner's offline server taking its roles
when they have no endpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gleaner.config import GleanerConfig
from gleaner.engine.stage import Stage
from gleaner.registry import registry


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


def pool_stage(name: str) -> PoolStage:
    return registry("pool_stage").get(name)


def pool_stages() -> dict[str, PoolStage]:
    return dict(registry("pool_stage").items())
