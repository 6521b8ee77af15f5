"""DEITA's stages on the engine: complexity/quality scores and embeddings.

- ``score`` with the ``hf`` scorer: an actor stage (each Ray actor loads the
  causal LM once and scores many batches); with the ``endpoint`` scorer: an LLM
  stage (Prefect tasks on Ray, the shared client and its cluster-wide limits).
- ``embed``: an actor stage holding the encoder (GPU actors when
  ``embed.resources.gpus`` > 0).

Both are cached across runs by (example id, settings), like every engine stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.config import EmbedConfig, EndpointConfig, GleanerConfig, ScoreConfig
from gleaner.devices import placement
from gleaner.engine import Conversation, LLMRowStage, Stage, rows_table, stage_schema
from gleaner.engine.stage import COST_COLUMNS, declare
from gleaner.registry import register, registry
from gleaner.schema import user_assistant_pairs
from gleaner.tasks.deita import embed as embed_tasks
from gleaner.tasks.deita import score as score_tasks

SCORE_PROMPT_VERSION = "deita-v1"  # the scorer prompts of SPEC §2 (part of the cache key)

SCORE_SCHEMA = stage_schema(
    pa.field("complexity", pa.float64()),  # mean over turns (null when failed)
    pa.field("quality", pa.float64()),  # mean over turns
    pa.field("evol", pa.float64()),  # sum over turns of complexity * quality
    pa.field("turns", pa.int32(), nullable=False),
    pa.field("complexity_turns", pa.list_(pa.float64())),
    pa.field("quality_turns", pa.list_(pa.float64())),
    pa.field("complexity_model", pa.string(), nullable=False),
    pa.field("quality_model", pa.string(), nullable=False),
    llm=True,
)


class _ScoreBase:
    """What both score stages share: settings, schema, summary."""

    name = layout.SCORE
    input_stage = layout.INGEST
    input_columns = ("id", "conversation")
    summary_columns = ("complexity", "quality", "evol")
    description = "DEITA complexity and quality scores"
    settings: ScoreConfig

    @property
    def schema(self) -> pa.Schema:
        return SCORE_SCHEMA

    def requested(self) -> dict[str, Any]:
        c_name, q_name = score_tasks.model_names(self.settings)
        return {"backend": self.settings.backend, "complexity_model": c_name,
                "quality_model": q_name, "prompt_version": SCORE_PROMPT_VERSION,
                "max_length": self.settings.max_length}

    def row_defaults(self) -> dict[str, Any]:
        c_name, q_name = score_tasks.model_names(self.settings)
        return {"turns": 0, "complexity_model": c_name, "quality_model": q_name}

    def summarize(self, table: pa.Table) -> dict[str, Any]:
        ok = table.filter(pc.equal(table["status"], "ok"))
        c_name, q_name = score_tasks.model_names(self.settings)
        summary: dict[str, Any] = {"scored": ok.num_rows, "complexity_model": c_name,
                                   "quality_model": q_name}
        for column in ("complexity", "quality", "evol"):
            mean = pc.mean(ok[column]).as_py() if ok.num_rows else None
            summary[f"mean_{column}"] = None if mean is None else round(mean, 4)
        return summary

    def markdown(self, summary: Mapping[str, Any]) -> str:
        from gleaner.engine.summary import counts_markdown

        return "\n".join([
            counts_markdown(summary), "",
            f"Models: {summary.get('complexity_model')} / {summary.get('quality_model')}", "",
            "| mean complexity | mean quality | mean evol |", "|---:|---:|---:|",
            f"| {summary.get('mean_complexity')} | {summary.get('mean_quality')} | "
            f"{summary.get('mean_evol')} |",
        ])


class HFScoreWorker:
    def __init__(self, settings: ScoreConfig):
        kwargs = {"device": settings.device, "batch_size": settings.forward_batch_size,
                  "max_length": settings.max_length}
        scorer = registry("scorer").get(settings.backend)
        self.complexity = scorer(settings.complexity_model, **kwargs)
        self.quality = scorer(settings.quality_model, **kwargs)
        self.device = placement(getattr(self.complexity, "model", None))

    def process(self, rows: pa.Table) -> pa.Table:
        examples = rows.to_pylist()
        c_prompts, q_prompts = score_tasks.turn_prompts(examples)
        out = score_tasks.score_rows(examples, self.complexity.score(c_prompts),
                                     self.quality.score(q_prompts), self.complexity.name,
                                     self.quality.name)
        return rows_table(out, SCORE_SCHEMA)

    def close(self) -> None:
        return None


class ScoreStage(_ScoreBase, Stage):
    """Scores from a causal LM each Ray actor holds (the offline default: SmolLM2)."""

    declared = declare(batch_size=64, concurrency=16)

    kind = "actor"

    def __init__(self, section: ScoreConfig):
        super().__init__(section)
        self.settings = section

    def open(self) -> HFScoreWorker:
        return HFScoreWorker(self.settings)


class EndpointScoreStage(_ScoreBase, LLMRowStage):
    """DEITA's scorers behind an OpenAI-compatible /v1/completions endpoint (vLLM)."""

    declared = declare(batch_size=64, concurrency=16)

    def __init__(self, section: ScoreConfig):
        super().__init__(section)
        self.settings = section
        if section.endpoint is None or not section.endpoint.base_url:
            raise ValueError(f"score.backend {section.backend!r} needs score.endpoint.base_url")
        base = section.endpoint
        self.complexity_endpoint = base.model_copy(
            update={"model": section.complexity_model or base.model})
        self.quality_endpoint = base.model_copy(
            update={"model": section.quality_model or base.model})

    @property
    def endpoint(self) -> EndpointConfig:
        return self.complexity_endpoint

    def endpoints(self) -> list[EndpointConfig]:
        same = self.quality_endpoint.model == self.complexity_endpoint.model
        return [self.complexity_endpoint] + ([] if same else [self.quality_endpoint])

    async def probe(self, client: Any) -> dict[str, Any]:
        await client.complete(score_tasks.complexity_prompt("Say hello."), max_tokens=1,
                              logprobs=self.settings.top_logprobs)
        return {}

    def conversation(self, row: dict[str, Any]) -> Conversation:
        """Every turn's complexity and quality prompt at once, each scored once; a row with a
        failed prompt is failed with the first three errors."""
        turns = user_assistant_pairs(row["conversation"])
        top = self.settings.top_logprobs
        complexity, quality = self.complexity_endpoint.model, self.quality_endpoint.model
        calls = [score_tasks.score_call(score_tasks.complexity_prompt(u), top, complexity)
                 for u, _ in turns]
        calls += [score_tasks.score_call(score_tasks.quality_prompt(u, a), top, quality)
                  for u, a in turns]
        readings = (yield calls) if calls else []
        outcomes = [score_tasks.scored(r) for r in readings]
        [record] = score_tasks.score_rows([row], outcomes[:len(turns)], outcomes[len(turns):],
                                          complexity, quality)
        return {k: v for k, v in record.items() if k not in COST_COLUMNS}


@register("planned_stage", "score")
def planned_scoring(config: GleanerConfig) -> EndpointScoreStage | None:
    """The endpoint scorer's calls for the cost plan (a scorer on Ray actors costs none)."""
    if registry("scorer").get(config.score.backend).uses_endpoint:
        return EndpointScoreStage(config.score)
    return None


def score_stage(section: ScoreConfig) -> Stage:
    """The score stage for the configured scorer: an endpoint's, or a model held by actors."""
    if registry("scorer").get(section.backend).uses_endpoint:
        return EndpointScoreStage(section)
    return ScoreStage(section)


# ---- embeddings ------------------------------------------------------------------------------
class EmbedWorker:
    def __init__(self, settings: EmbedConfig):
        self.encoder = embed_tasks.Encoder(settings.model, settings.pooling,
                                           max_length=settings.max_length,
                                           batch_size=settings.forward_batch_size)
        self.device = placement(self.encoder.model)

    def process(self, rows: pa.Table) -> pa.Table:
        texts = [embed_tasks.example_text(r) for r in rows.to_pylist()]
        vectors = self.encoder.encode(texts)
        return embed_tasks.vectors_table(rows.column("id").to_pylist(), self.encoder.name,
                                         vectors)

    def close(self) -> None:
        return None


class EmbedStage(Stage):
    """Every example's conversation embedded by an encoder each Ray actor holds."""

    declared = declare(batch_size=256, actors=1)

    name = layout.EMBED
    input_stage = layout.INGEST
    input_columns = ("id", "conversation")
    kind = "actor"
    description = "embeddings for DEITA's diversity filter"

    def __init__(self, section: EmbedConfig):
        super().__init__(section)
        self.settings = section
        self.model = embed_tasks.model_name(section.model, section.pooling)
        self.dim = embed_tasks.model_dim(section.model, section.pooling)

    @property
    def schema(self) -> pa.Schema:
        return embed_tasks.embed_schema(self.dim)

    def requested(self) -> dict[str, Any]:
        return {"model": self.model, "text_format": embed_tasks.TEXT_FORMAT,
                "max_length": self.settings.max_length}

    def row_defaults(self) -> dict[str, Any]:
        return {"model": self.model}

    def open(self) -> EmbedWorker:
        return EmbedWorker(self.settings)

    def summarize(self, table: pa.Table) -> dict[str, Any]:
        return {"model": self.model, "dim": self.dim}
