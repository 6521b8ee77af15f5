"""The stage engine: one way for every batched stage to plan, resume, cache, fail and report.

A stage declares what it reads, what it writes, the settings that change its
rows and ``process(batch) -> table`` (:mod:`gleaner.engine.stage`); the engine
(:func:`run_stage`) owns everything else. See docs/engine.md.
"""

from gleaner.engine.failures import BatchUnavailable, FatalStageError, StageFailed
from gleaner.engine.lease import LeaseHeld
from gleaner.engine.llm_rows import (
    Call,
    Conversation,
    LLMRowStage,
    ParseFailure,
    Reading,
)
from gleaner.engine.plan import PlanMismatch
from gleaner.engine.runner import read_summary, run_stage
from gleaner.engine.stage import (
    AsyncBatchWorker,
    BatchWorker,
    Context,
    LLMStage,
    Stage,
    rows_table,
    stage_schema,
)

__all__ = [
    "AsyncBatchWorker",
    "BatchUnavailable",
    "Call",
    "Conversation",
    "BatchWorker",
    "Context",
    "FatalStageError",
    "LLMRowStage",
    "LLMStage",
    "LeaseHeld",
    "ParseFailure",
    "PlanMismatch",
    "Reading",
    "Stage",
    "StageFailed",
    "read_summary",
    "rows_table",
    "run_stage",
    "stage_schema",
]
