"""The EVOL stage on the engine: each seed evolved M times, then its M+1 versions scored.

One row per seed example of the run's ``ingest``: the versions (the seed first), the method
of each round, the scores of the one rank-and-score call, its raw answer. The rounds of a
seed are sequential (each rewrites the previous version); seeds run concurrently under the
client's limits (the engine's row loop, gleaner.engine.llm_rows). A rewrite that fails or
comes back empty, or a ranking that cannot be read after ``parse_retries`` more asks, makes
the row ``failed`` with the error and whatever was made so far (versions, raw answer). Rows
are cached by (seed id, the settings below).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.config import EndpointConfig, EvolConfig
from gleaner.engine import Call, Conversation, LLMRowStage, ParseFailure, stage_schema
from gleaner.engine.llm_rows import RowFailed
from gleaner.engine.stage import declare
from gleaner.llm.offline import OfflineRole, capped_concurrency
from gleaner.registry import register
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


def read_rewrite(completion: Any) -> str:
    text = prompts.clean_rewrite(completion.text)
    if not text:
        raise ParseFailure("the rewriter answered with empty text", kind="empty")
    return text


def score_reader(count: int) -> Callable[[Any], list[int]]:
    def read(completion: Any) -> list[int]:
        parsed = parse_scores(completion.text, count)
        if parsed.scores is None:
            raise ParseFailure(f"rank-and-score answer unreadable: {parsed.reason}")
        return parsed.scores

    return read


class EvolStage(LLMRowStage):
    """DEITA's EVOL complexity (instructions) or quality (responses) of every seed."""

    declared = declare(batch_size=16, concurrency=16)

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
                "score_max_tokens": s.score.max_tokens, "parse_retries": s.parse_retries,
                "score_grammar": bool(s.score.grammar)}

    def conversation(self, row: dict[str, Any]) -> Conversation:
        """The seed's M rewrites (each of the previous version), then one ranking of all;
        a failure keeps the versions made so far."""
        s, kind = self.settings, self.kind
        question, response = seed_of(row)
        versions = [question if kind == "complexity" else response]
        methods = ["seed"]
        try:
            for method in prompts.round_methods(kind, row["id"], s.rounds):
                ask = prompts.rewrite_prompt(kind, method, versions[-1], question)
                rewrite = yield Call(read_rewrite, [{"role": "user", "content": ask}],
                                     max_tokens=s.max_tokens, temperature=s.temperature,
                                     parse_retries=0)
                versions.append(rewrite.value)
                methods.append(method)
            options = ({"extra_body": {"grammar": prompts.rank_grammar(kind, len(versions))}}
                       if s.score.grammar else {})
            ranking = yield Call(
                score_reader(len(versions)),
                [{"role": "user", "content": prompts.rank_prompt(kind, versions, question)}],
                max_tokens=s.score.max_tokens, options=options)
        except RowFailed:
            return {"instruction": question, "versions": versions, "methods": methods}
        return {"instruction": question, "versions": versions, "methods": methods,
                "scores": ranking.value}

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


register("offline_role", "rewriter")(OfflineRole(
    "evol.endpoint", lambda c: {  # short rewrites (a 2,048-token context), "[k] Score: n"
        "evol.max_tokens": min(c.evol.max_tokens, c.evol.offline_max_tokens),
        "evol.score.grammar": c.evol.score.grammar is not False,
        **capped_concurrency(c, "evol.resources")}))
