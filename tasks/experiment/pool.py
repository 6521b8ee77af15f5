"""The pool of an experiment: which run holds it, and which of its stages the arms read.

Every selection signal names the stage that makes it (gleaner.tasks.select.signals);
DEITA's selector also reads the embeddings. The stages the arms need run once,
on the pool, for all arms; a stage the pool already holds is resumed or reused
like any engine stage.
"""

from __future__ import annotations

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.registry import registry
from gleaner.tasks.experiment.arms import Selection


def pool_run(config: GleanerConfig, run_id: str) -> str:
    """The run holding the pool: the one named, else the experiment's own (it ingests there)."""
    pool = config.experiment.pool
    if bool(pool.sources) == bool(pool.run_id):
        raise ValueError("experiment.pool: give either sources (ingested into the experiment's "
                         "run) or run_id (a run that holds an ingest), not both or neither")
    return pool.run_id or run_id


def stages_of(selection: Selection) -> list[str]:
    """The pool stages one selection reads: its signals' stages, the embeddings for DEITA."""
    from gleaner.tasks.select.selectors import selector

    signals = registry("signal")
    stages: list[str] = []
    for name in selection.needs:
        if name not in signals:
            raise ValueError(f"arm {selection.name!r} sorts or filters by {name!r}, which no "
                             f"stage makes; known signals: {', '.join(signals.names())}")
        stages.append(signals.get(name).stage)
    if selector(selection.select.selector).needs_vectors:
        stages.append(layout.EMBED)
    return list(dict.fromkeys(stages))


def needed_stages(selections: list[Selection]) -> list[str]:
    """The pool stages the selections read, each once, in the order the pipeline makes them."""
    pipeline = [layout.RATE, layout.SCORE, layout.EMBED, layout.IFD, layout.LENGTH]
    unique = list(dict.fromkeys(s for selection in selections for s in stages_of(selection)))
    return sorted(unique, key=lambda s: pipeline.index(s) if s in pipeline else len(pipeline))


def signals_cost(selection: Selection, summaries: dict[str, dict], config: GleanerConfig
                 ) -> float | None:
    """What the signals a selection reads cost to make (the pool's stage summaries; None
    where a stage's price is unknown; nothing when gleaner's offline server rated). Shared
    stages count in full for every arm reading them."""
    total = 0.0
    for stage in stages_of(selection):
        summary = summaries.get(stage) or {}
        if stage == layout.RATE and config.rate.endpoint.local_server:
            continue
        if summary.get("requests") and not summary.get("price_known", True):
            return None
        total += float(summary.get("est_cost_usd") or 0.0)
    return round(total, 6)
