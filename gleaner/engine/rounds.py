"""Stages that grow their own input, run in rounds on the engine's plan, parts, lease and limits.

Self-instruct is not a map over batches: what round r asks depends on what rounds < r kept
(the pool grows as it runs). Such a stage (:class:`RoundStage`) runs on the driver in rounds:

1. take the stage's lease; check the plan (same settings, or refuse naming them / --force);
2. replay the finished rounds (part ``i`` exists: round ``i`` is done) in order, rebuilding the
   stage's state from its own parts, so a killed run resumes at the first missing round with
   the same state as a run that never stopped;
3. while the stage wants another round: probe the endpoint once (a rejected key stops here),
   send the round's requests as one async batch through one LLM client (the cluster-wide
   limiter, the per-batch concurrency, the SDK back-off: :meth:`LLMStage.client`), let the stage
   settle the answers against its state, write the round as one part, atomically;
4. summarise from the parts (one row per request: ok + failed = rows), add the stage's own
   counts, write the summary and the artifact, fail past the failure budget.

A round whose every request failed transiently is asked again (``resources.retries`` times,
``retry_delay_s`` apart) before anything is written, then the stage stops
(:class:`BatchUnavailable`) and a rerun resumes at that round. A fatal error (rejected key,
unknown model, dead local server) stops at once, before the round is written.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.engine.failures import BatchUnavailable, FatalStageError, check_budget
from gleaner.engine.lease import Lease
from gleaner.engine.plan import Plan, check_requested, check_resolved, write_plan
from gleaner.engine.runner import stage_limiters, stage_progress
from gleaner.engine.stage import COST_COLUMNS, Context, LLMStage
from gleaner.engine.summary import publish_summary, stage_summary
from gleaner.progress import progress
from gleaner.store import Store

log = logging.getLogger("gleaner.engine.rounds")
TRANSIENT_KINDS = ("transient", "unreachable")


class RoundStage(LLMStage):
    """A stage whose requests depend on its own earlier rounds. Rows: one per request."""

    cacheable = False  # a round depends on the rounds before it, not on an input row
    progress_unit = "round"

    @abc.abstractmethod
    def replay(self, index: int, part: pa.Table) -> None:
        """Fold finished round ``index`` (its part, as written) into the state."""

    @abc.abstractmethod
    def stop_reason(self) -> str | None:
        """Why no further round is needed; None: run another."""

    @abc.abstractmethod
    async def ask(self, index: int, client: Any) -> list[dict[str, Any]]:
        """Send round ``index``'s requests (one async batch); its rows, undecided. Must not
        change the state (the round may be asked again). Raises fatal LLM errors."""

    @abc.abstractmethod
    def settle(self, index: int, rows: list[dict[str, Any]]) -> pa.Table:
        """Decide the asked rows against the state, update the state as :meth:`replay` would
        for the returned part, and return it."""

    def progress_of(self) -> tuple[int, int | None]:
        """(done, total) for the progress bar, in the stage's own unit."""
        return 0, None

    def clear(self, store: Store, run_id: str) -> None:
        """--force: forget the stage's parts (and whatever else the stage derived from them)."""
        store.clear_stage(run_id, self.name)

    def complete(self, store: Store, run_id: str, summary: dict[str, Any]) -> dict[str, Any]:
        """After the last round, inside the lease: publish derived output; returns summary
        fields."""
        return {}

    def open(self) -> Any:
        raise TypeError(f"{self.name} runs in rounds on the driver (gleaner.engine.rounds."
                        "run_rounds), not as batches on workers")


def _in_flow_run() -> bool:
    """Artifacts need a flow run: outside one Prefect would start a throw-away API (seconds)."""
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


@contextlib.contextmanager
def _progress(stage: RoundStage, run_id: str) -> Iterator[Any]:
    done, total = stage.progress_of()
    if _in_flow_run() and total is not None:
        with stage_progress(stage, run_id, total, done, stage.progress_unit) as bar:
            yield bar
        return
    with progress(total, f"{stage.name} {run_id}", unit=stage.progress_unit,
                  initial=done) as bar:
        yield bar


def _all_transient(rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and all(r.get("status") == "failed" and r.get("error_kind")
                              in TRANSIENT_KINDS for r in rows)


async def _ask_until_answered(stage: RoundStage, index: int, client: Any) -> list[dict[str, Any]]:
    res = stage.resources
    for attempt in range(res.retries + 1):
        rows = await stage.ask(index, client)
        if not _all_transient(rows):
            return rows
        if attempt < res.retries:
            log.warning("%s round %05d: every request failed (%s); asking again in %.0fs",
                        stage.name, index, rows[0].get("error"), res.retry_delay_s)
            await asyncio.sleep(res.retry_delay_s)
    raise BatchUnavailable(
        f"{stage.name} round {index:05d}: all {len(rows)} requests failed transiently "
        f"{res.retries + 1} times (first: {rows[0].get('error')}); nothing of this round is "
        "written: rerun to resume from it")


async def _run(stage: RoundStage, store: Store, run_id: str, start: int, bar: Any) -> None:
    """Rounds from ``start`` until the stage stops."""
    from gleaner.llm.client import LLMError

    index = start
    async with stage.client() as client:
        while stage.stop_reason() is None:
            before = stage.progress_of()[0]
            try:
                rows = await _ask_until_answered(stage, index, client)
            except LLMError as error:
                if not error.fatal:
                    raise
                raise FatalStageError(f"{stage.name}: {error}", error.kind) from None
            store.write_part(run_id, stage.name, index, stage.settle(index, rows))
            bar.update(max(0, stage.progress_of()[0] - before))
            index += 1


def run_rounds(stage: RoundStage, config: GleanerConfig, run_id: str) -> dict[str, Any]:
    """Run ``stage`` for ``run_id`` until it stops; returns (and stores) its summary."""
    started = time.perf_counter()
    store = Store(config.store.url, config.store.options)
    with Lease(store, run_id, stage.name):
        if stage.section.force:
            stage.clear(store, run_id)
        plan = Plan(stage.name, stage.requested(), {"kind": "rounds"})
        previous = check_requested(store, run_id, plan)
        parts = store.part_paths(store.stage_path(run_id, stage.name))
        if list(parts) != list(range(len(parts))):
            raise RuntimeError(f"{stage.name} of run {run_id!r} has parts {sorted(parts)}: "
                               "rounds are written in order, so a gap means another writer")
        for index, path in parts.items():
            stage.replay(index, store.dataset([path], schema=stage.schema).to_table())
        ctx, resumed = Context(store, run_id, config), len(parts)
        stopped: FatalStageError | BatchUnavailable | None = None
        if stage.stop_reason() is None:
            plan.resolved = stage.resolve(ctx)
            check_resolved(previous, plan, run_id)
            write_plan(store, run_id, plan)
            holder = stage_limiters(stage, shares=1)  # the buckets live while the rounds run
            try:
                with _progress(stage, run_id) as bar:
                    asyncio.run(_run(stage, store, run_id, resumed, bar))
            except (FatalStageError, BatchUnavailable) as error:
                stopped = error
            finally:
                del holder
        else:
            plan.resolved = (previous or {}).get("resolved") or stage.requested()
            stage.adopt(plan.resolved)
            write_plan(store, run_id, plan)
        rounds = len(store.part_paths(store.stage_path(run_id, stage.name)))
        summary = _summary(stage, store, run_id, config, plan, ctx, stopped, rounds=rounds,
                           resumed=resumed, seconds=time.perf_counter() - started)
        if stopped is None:
            summary.update(stage.complete(store, run_id, summary))
        store.write_json(layout.summary_path(store, run_id, stage.name), summary)
    publish_summary(stage, run_id, summary)
    if stopped is not None:
        raise stopped
    check_budget(stage.name, summary["failed"], summary["examples"], stage.section.max_failed_share)
    return summary


def _summary(stage: RoundStage, store: Store, run_id: str, config: GleanerConfig, plan: Plan,
             ctx: Context, fatal: BaseException | None, *, rounds: int, resumed: int,
             seconds: float) -> dict[str, Any]:
    columns = ["id", "status", "error_kind", "cached",
               *(c for c in COST_COLUMNS if c in stage.schema.names)]
    table = (store.read_stage(run_id, stage.name, columns=columns, schema=stage.schema)
             if rounds else stage.schema.empty_table())
    summary = stage_summary(stage, run_id, plan, table, ctx.usage, stage.price(config),
                            examples=table.num_rows, fatal=fatal)
    summary.update(rounds=rounds, rounds_resumed=resumed, seconds=round(seconds, 3))
    summary.update(stage.summarize(table))
    return summary
