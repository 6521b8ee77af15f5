"""The EVOL stage on the engine: each seed evolved M times, then its M+1 versions scored.

One row per seed example of the run's ``ingest``: the versions (the seed first), the method
of each round, the scores of the one rank-and-score call, its raw answer. The rounds of a
seed are sequential (each rewrites the previous version); seeds run concurrently under the
client's limits. A rewrite that fails or comes back empty, or a ranking that cannot be read
after ``parse_retries`` more asks, makes the row ``failed`` with the error and whatever was
made so far (versions, raw answer). Rows are cached by (seed id, the settings below).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.config import EndpointConfig, EvolConfig
from gleaner.engine import AsyncBatchWorker, LLMStage, rows_table, stage_schema
from gleaner.llm.client import Completion, LLMClient, LLMError
from gleaner.schema import user_assistant_pairs
from gleaner.tasks.evol import prompts
from gleaner.tasks.evol.parse import parse_scores

EVOL_SCHEMA = stage_schema(
    pa.field("kind", pa.string(), nullable=False),
    pa.field("instruction", pa.string(), nullable=False),  # the seed's question
    pa.field("versions", pa.list_(pa.string())),  # seed first; what was made when failed
    pa.field("methods", pa.list_(pa.string())),  # "seed", then each round's method
    pa.field("scores", pa.list_(pa.int32())),  # null unless status == "ok"
    pa.field("raw", pa.string()),  # the rank-and-score answer
    pa.field("model", pa.string(), nullable=False),
    llm=True,
)


def seed_of(row: Mapping[str, Any]) -> tuple[str, str]:
    """(question, response) of a seed: its final exchange; the input is part of the question."""
    turns = user_assistant_pairs(row.get("conversation") or [])
    if turns:
        return turns[-1]
    given = row.get("input") or ""
    question = f"{row['instruction']}\n\n{given}" if given else row["instruction"]
    return question, row.get("output") or ""


class _Row:
    """One seed's row being made, with what its calls cost."""

    def __init__(self, row: Mapping[str, Any], kind: prompts.Kind, model: str):
        self.question, response = seed_of(row)
        seed_text = self.question if kind == "complexity" else response
        self.out: dict[str, Any] = {
            "id": row["id"], "kind": kind, "instruction": self.question, "model": model,
            "versions": [seed_text], "methods": ["seed"], "scores": None, "raw": None,
            "status": "failed", "attempts": 0, "prompt_tokens": 0, "completion_tokens": 0,
            "latency_ms": 0.0}

    def spend(self, completion: Completion) -> None:
        for key in ("attempts", "prompt_tokens", "completion_tokens", "latency_ms"):
            self.out[key] += getattr(completion, key)

    def fail(self, error: str, kind: str) -> dict[str, Any]:
        return {**self.out, "error": error, "error_kind": kind}


async def evolve_one(row: Mapping[str, Any], client: LLMClient, stage: EvolStage
                     ) -> dict[str, Any]:
    """A seed's M rewrites and their ranking; raises only a fatal client error."""
    s, kind = stage.settings, stage.kind
    made = _Row(row, kind, client.model)
    versions = made.out["versions"]
    try:
        for method in prompts.round_methods(kind, row["id"], s.rounds):
            ask = prompts.rewrite_prompt(kind, method, versions[-1], made.question)
            completion = await client.chat([{"role": "user", "content": ask}],
                                           max_tokens=s.max_tokens, temperature=s.temperature)
            made.spend(completion)
            text = prompts.clean_rewrite(completion.text)
            if not text:
                return made.fail(f"round {len(versions)} ({method}): the rewriter answered "
                                 "with empty text", "empty")
            versions.append(text)
            made.out["methods"].append(method)
        extra = ({"extra_body": {"grammar": prompts.rank_grammar(kind, len(versions))}}
                 if s.score_grammar else {})
        reason = ""
        for _ in range(s.parse_retries + 1):
            completion = await client.chat(
                [{"role": "user", "content": prompts.rank_prompt(kind, versions, made.question)}],
                max_tokens=s.score_max_tokens, temperature=0.0, **extra)
            made.spend(completion)
            made.out["raw"] = completion.text
            parsed = parse_scores(completion.text, len(versions))
            if parsed.scores is not None:
                return {**made.out, "scores": parsed.scores, "status": "ok"}
            reason = parsed.reason or "unreadable"
        return made.fail(f"rank-and-score answer unreadable after {s.parse_retries + 1} tries: "
                         f"{reason}", "parse")
    except LLMError as error:
        if error.fatal:
            raise
        made.out["attempts"] += error.attempts
        return made.fail(str(error), error.kind)


class EvolWorker(AsyncBatchWorker):
    stage: EvolStage

    async def aprocess(self, rows: pa.Table, client: LLMClient) -> pa.Table:
        results = await asyncio.gather(*(evolve_one(r, client, self.stage)
                                         for r in rows.to_pylist()))
        return rows_table(results, EVOL_SCHEMA)


class EvolStage(LLMStage):
    """DEITA's EVOL complexity (instructions) or quality (responses) of every seed."""

    input_stage = layout.INGEST
    input_columns = ("id", "instruction", "input", "output", "conversation")
    summary_columns = ("scores",)

    def __init__(self, section: EvolConfig, kind: prompts.Kind):
        super().__init__(section)
        if kind not in prompts.KINDS:
            raise ValueError(f"EVOL kind must be complexity or quality, not {kind!r}")
        self.settings = section
        self.kind = kind
        self.name = layout.evol_stage(kind)
        self.description = f"DEITA EVOL {kind}: {section.rounds} rewrites, one ranking"

    @property
    def endpoint(self) -> EndpointConfig:
        return self.settings.endpoint

    @property
    def schema(self) -> pa.Schema:
        return EVOL_SCHEMA

    def requested(self) -> dict[str, Any]:
        s = self.settings
        return {"kind": self.kind, "model": self.endpoint.model,
                "prompt_version": prompts.PROMPT_VERSION, "rounds": s.rounds,
                "temperature": s.temperature, "max_tokens": s.max_tokens,
                "score_max_tokens": s.score_max_tokens, "parse_retries": s.parse_retries,
                "score_grammar": bool(s.score_grammar)}

    def open(self) -> EvolWorker:
        return EvolWorker(self)

    def row_defaults(self) -> dict[str, Any]:
        return {"kind": self.kind, "instruction": "", "model": self.endpoint.model}

    def summarize(self, table: pa.Table) -> dict[str, Any]:
        ok = table.filter(pc.equal(table["status"], "ok"))
        scores = [v for row in ok.column("scores").to_pylist() for v in row or []]
        return {"kind": self.kind, "model": self.endpoint.model, "rounds": self.settings.rounds,
                "seeds_ok": ok.num_rows, "items": len(scores),
                "score_counts": {str(k): scores.count(k)
                                 for k in range(1, self.settings.rounds + 3)}}

    def markdown(self, summary: Mapping[str, Any]) -> str:
        from gleaner.engine.summary import counts_markdown

        counts = " ".join(f"{k}:{v}" for k, v in (summary.get("score_counts") or {}).items())
        return (f"EVOL {summary.get('kind')} with `{summary.get('model')}`: "
                f"{summary.get('seeds_ok', 0):,} seeds, {summary.get('items', 0):,} scored "
                f"versions (scores {counts})\n\n" + counts_markdown(summary))
