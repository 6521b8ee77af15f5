"""The rating stage (AlpaGasus, SPEC §1) on the engine: one rating row per example.

Reads ``ingest`` (instruction, input, output and the conversation, so a
multi-turn example is rated in context) and asks the configured rater
(:mod:`gleaner.tasks.rate.raters`). The engine's row loop (gleaner.engine.llm_rows)
retries unparseable answers ``parse_retries`` times and then records a parse
failure with the raw text: never a zero; the engine does the rest (plan, parts,
cache, failed batches, limits, summary).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.config import EndpointConfig, GleanerConfig, RateConfig
from gleaner.engine import Context, stage_schema
from gleaner.engine.llm_rows import Conversation, LLMRowStage, LLMRowWorker
from gleaner.engine.stage import declare
from gleaner.llm.client import LLMClient
from gleaner.llm.offline import OfflineRole, capped_concurrency
from gleaner.registry import register
from gleaner.tasks.rate.prompt import RatingPrompt, build_prompt
from gleaner.tasks.rate.raters import NO_LOGPROBS, RateOptions, rater

log = logging.getLogger("gleaner.rate")
BUCKETS = [i / 2 for i in range(11)]  # 0.0, 0.5, ..., 5.0

RATING_SCHEMA = stage_schema(
    pa.field("dimension", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("prompt_version", pa.string(), nullable=False),
    pa.field("mode", pa.string(), nullable=False),  # the mode actually used for this row
    pa.field("score", pa.float64()),  # null unless status == "ok"
    pa.field("raw", pa.string()),
    llm=True,
)


def histogram(scores: Sequence[float] | np.ndarray) -> dict[str, int]:
    """Counts per 0.5 bucket (a score s counts in bucket floor(2s)/2), like the paper's Fig. 4."""
    values = np.asarray(scores, dtype=np.float64)
    buckets = np.clip(np.floor(values * 2), 0, 10).astype(np.int64)
    counts = np.bincount(buckets, minlength=len(BUCKETS))
    return {f"{b:.1f}": int(n) for b, n in zip(BUCKETS, counts, strict=True)}


async def rate_batch(rows: list[dict[str, Any]], client: LLMClient, prompt: RatingPrompt,
                     mode: str, options: RateOptions | None = None) -> pa.Table:
    """Rate every example concurrently (the client's semaphore caps it): one row each, in
    input order, ``ok`` with a score or ``failed`` with the error; nothing is dropped."""
    options = options or RateOptions()
    stage = RateStage(RateConfig(endpoint=client.endpoint, mode=mode,
                                 parse_retries=options.parse_retries,
                                 max_tokens=options.explain_max_tokens,
                                 top_logprobs=options.top_logprobs))
    stage.prompt = prompt
    return await RateWorker(stage).aprocess(pa.Table.from_pylist(rows), client)


class RateWorker(LLMRowWorker):
    stage: RateStage

    async def aprocess(self, rows: pa.Table, client: LLMClient) -> pa.Table:
        table = await super().aprocess(rows, client)
        if any(m != self.stage.mode for m in table.column("mode").to_pylist()):
            log.warning("endpoint model %r returned no logprobs: %s fell back to explain",
                        client.model, self.stage.mode)
        return table


class RateStage(LLMRowStage):
    """AlpaGasus rating of every ingested example."""

    declared = declare(batch_size=512, cpus=1.0, concurrency=16)

    name = layout.RATE
    input_stage = layout.INGEST
    input_columns = ("id", "instruction", "input", "output", "conversation")
    summary_columns = ("score", "model", "mode")
    description = "AlpaGasus rating"

    def __init__(self, section: RateConfig):
        super().__init__(section)
        self.settings = section
        self.prompt = build_prompt(section.dimension, section.template_file)
        self.mode = section.mode or "explain"
        self.options = RateOptions(section.parse_retries, section.max_tokens,
                                   section.top_logprobs)
        self.mode_note: str | None = None

    @property
    def endpoint(self) -> EndpointConfig:
        return self.settings.endpoint

    @property
    def schema(self) -> pa.Schema:
        return RATING_SCHEMA

    def requested(self) -> dict[str, Any]:
        return {"model": self.endpoint.model, "prompt_version": self.prompt.version,
                "dimension": self.prompt.dimension, "mode": self.settings.mode or "explain"}

    async def probe(self, client: LLMClient) -> dict[str, Any]:
        """One real rating request: the key, the model, and whether logprobs come back."""
        example = {"instruction": "Say hello.", "input": "", "output": "Hello!"}
        if rater(self.mode).needs_logprobs:
            completion = await client.chat(self.prompt.messages(example), max_tokens=1,
                                           logprobs=True, top_logprobs=self.options.top_logprobs)
            return {"logprobs": completion.top_logprobs is not None}
        await client.chat(self.prompt.messages(example), max_tokens=1)
        return {}

    def resolve(self, ctx: Context) -> dict[str, Any]:
        learnt = self.run_probe(ctx)
        if rater(self.mode).needs_logprobs and not learnt.get("logprobs"):
            self.mode_note = (f"endpoint model {self.endpoint.model!r} returns no logprobs: "
                              f"{self.mode} mode falls back to explain for this run")
            log.warning(self.mode_note)
            self.mode = "explain"
        return {**self.requested(), "mode": self.mode}

    def adopt(self, resolved: dict[str, Any]) -> None:
        self.mode = resolved.get("mode", self.mode)

    def conversation(self, row: dict[str, Any]) -> Conversation:
        """The configured rater's call; score-only without logprobs asks again in explain."""
        messages = self.prompt.messages(row)
        mode = self.mode
        reading = yield rater(mode).call(messages, self.options)
        if reading.value is NO_LOGPROBS:  # the endpoint's limitation, not a parse failure
            mode = "explain"
            reading = yield rater(mode).call(messages, self.options)
        return {"score": reading.value, "mode": mode}

    def open(self) -> RateWorker:
        return RateWorker(self)

    def row_defaults(self) -> dict[str, Any]:
        return {"dimension": self.prompt.dimension, "model": self.endpoint.model,
                "prompt_version": self.prompt.version, "mode": self.mode}

    def summarize(self, table: pa.Table) -> dict[str, Any]:
        ok = table.filter(pc.equal(table["status"], "ok"))
        scores = ok.column("score").drop_null().to_numpy()
        tau = self.settings.threshold
        kept = int(np.sum(scores >= tau))
        modes = sorted(pc.unique(ok.column("mode")).to_pylist())
        return {"model": self.endpoint.model, "dimension": self.prompt.dimension,
                "mode": self.mode, "modes_used": modes, "prompt_version": self.prompt.version,
                "threshold": tau, "read": table.num_rows, "rated": ok.num_rows, "kept": kept,
                "below": ok.num_rows - kept, "histogram": histogram(scores),
                "mode_note": self.mode_note}

    def markdown(self, summary: Mapping[str, Any]) -> str:
        lines = [
            f"# Rating of run `{summary['run_id']}`", "",
            f"model `{summary['model']}`, dimension **{summary['dimension']}**, "
            f"mode {summary['mode']}, threshold {summary['threshold']}", "",
            "| read | kept | below | failed | from cache |", "|---:|---:|---:|---:|---:|",
            f"| {summary['examples']} | {summary.get('kept', 0)} | {summary.get('below', 0)} | "
            f"{summary['failed']} | {summary['cached']} |", "",
            f"{summary['requests']} requests, {summary['prompt_tokens']} prompt + "
            f"{summary['completion_tokens']} completion tokens, est. "
            f"${summary['est_cost_usd']:.4f}", "",
            "| score | examples |", "|---:|---:|",
            *(f"| {b} | {n} |" for b, n in (summary.get("histogram") or {}).items()),
        ]
        if summary.get("failures"):
            lines += ["", "Failures: " + ", ".join(f"{k} {v}"
                                                   for k, v in summary["failures"].items())]
        if summary.get("mode_note"):
            lines += ["", f"Note: {summary['mode_note']}"]
        if summary.get("status") == "stopped":
            lines += ["", f"**Stopped**: {summary['stopped_because']}"]
        return "\n".join(lines)


register("offline_role", "rater")(OfflineRole(
    "rate.endpoint", lambda c: {"rate.mode": c.rate.mode or "score-only",
                                **capped_concurrency(c, "rate.resources")}))


@register("planned_stage", "rate")
def planned_rating(config: GleanerConfig) -> RateStage:
    """The rating as the cost plan counts it (the offline rater's one rule when no endpoint)."""
    from gleaner.llm.offline import offline_endpoint

    rate = config.rate
    if rate.endpoint.base_url is None:
        rate = rate.model_copy(update={"mode": rate.mode or "score-only",
                                       "endpoint": offline_endpoint(rate.endpoint)})
    return RateStage(rate)
