"""What a batched stage declares; the engine (gleaner.engine.runner) does the rest.

A stage is its own logic only::

    class RateStage(LLMStage):
        name = "rate"                      # where its parts go
        declared = declare(batch_size=512) # its resources and batch size (config overrides)
        input_stage = "ingest"             # what it reads, by id
        input_columns = ("id", "instruction", "input", "output", "conversation")
        def requested(self): ...           # the settings that change its rows (the plan)
        def resolve(self, ctx): ...        # the same, resolved at run time (a probe call)
        @property
        def schema(self): ...              # its rows: stage_schema(...) adds the engine's
        def open(self): ...                # on a worker: a BatchWorker (client or model)

and the engine owns the plan, the parts, the cache, failed rows, the LLM
client's cluster-wide limits, submission (Prefect tasks on Ray, or an actor
pool for stages that hold a model), workers reading their own batch, the
lease, the summary, the progress bar and the artifacts.

A stage object travels to the workers (pickled), so it holds settings and
names, never clients, models or secrets.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import pyarrow as pa

from gleaner.config import EndpointConfig, GleanerConfig, PriceConfig, Resources, StageSection
from gleaner.store import Store

# Columns every stage's rows carry (after its own), so the engine can count, cache and retry.
ENGINE_FIELDS = [
    pa.field("status", pa.string(), nullable=False),  # ok | failed
    pa.field("error", pa.string()),
    pa.field("error_kind", pa.string()),  # parse | transient | unreachable | http_error | task ...
    pa.field("cached", pa.bool_(), nullable=False),  # reused from another run (no cost now)
]
# ...and those of a stage that calls an LLM: what it cost.
LLM_FIELDS = [
    pa.field("attempts", pa.int32(), nullable=False),  # HTTP requests spent on this row
    pa.field("prompt_tokens", pa.int64(), nullable=False),
    pa.field("completion_tokens", pa.int64(), nullable=False),
    pa.field("latency_ms", pa.float64(), nullable=False),
]
COST_COLUMNS = ("attempts", "prompt_tokens", "completion_tokens", "latency_ms")


def stage_schema(*fields: pa.Field, llm: bool = False) -> pa.Schema:
    """``id``, the stage's own columns, then the engine's (and the LLM cost columns)."""
    own = [f for f in fields if f.name != "id"]
    return pa.schema([pa.field("id", pa.string(), nullable=False), *own, *ENGINE_FIELDS,
                      *(LLM_FIELDS if llm else [])])


def rows_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema,
               defaults: Mapping[str, Any] | None = None) -> pa.Table:
    """Rows as a table of ``schema``; missing engine/cost columns get their neutral values."""
    neutral: dict[str, Any] = {"cached": False, "error": None, "error_kind": None,
                               "attempts": 0, "prompt_tokens": 0, "completion_tokens": 0,
                               "latency_ms": 0.0, **(defaults or {})}
    filled = [{**{k: v for k, v in neutral.items() if k in schema.names}, **row} for row in rows]
    return pa.Table.from_pylist(filled, schema=schema)


# What a stage runs with unless it declares otherwise (``Stage.declared``) or the config sets a
# value (its section's ``resources``).
ENGINE_RESOURCES = {"batch_size": 256, "cpus": 1.0, "gpus": 0.0, "actors": 1, "concurrency": 16,
                    "retries": 2, "retry_delay_s": 10.0}


def declare(**values: Any) -> Resources:
    """A stage's own resources and batch size: the engine's, with ``values`` instead."""
    return Resources(**{**ENGINE_RESOURCES, **values})


def resolve_resources(declared: Resources, given: Resources) -> Resources:
    """What a stage runs with: its declared values, each one the config sets replaced."""
    return declared.model_copy(update=given.given())


class BatchWorker(Protocol):
    """What a stage's ``open()`` returns, on a worker: rows in, one row out per row in."""

    def process(self, rows: pa.Table) -> pa.Table: ...

    def close(self) -> None: ...


@dataclass
class Context:
    """What a stage may use on the driver (to resolve its settings): no rows."""

    store: Store
    run_id: str
    config: GleanerConfig
    usage: dict[str, int] = field(default_factory=dict)  # requests a probe spent

    def add_usage(self, usage: Mapping[str, int]) -> None:
        for k, v in usage.items():
            self.usage[k] = self.usage.get(k, 0) + int(v)


class Stage(abc.ABC):
    """A stage that maps batches of rows of ``input_stage`` to rows of its own."""

    name: str = ""
    input_stage: str = "ingest"
    input_columns: tuple[str, ...] = ("id",)
    kind: Literal["task", "actor"] = "task"  # actor: the worker holds a model (a Ray actor)
    cacheable: ClassVar[bool] = True  # rows depend only on the input row and the settings
    follows_input: ClassVar[bool] = False  # a changed input restarts the stage (see plan.py)
    summary_columns: tuple[str, ...] = ()  # beyond the engine's, for summarize()
    description: str = ""  # a line for people (artifacts, logs)
    # its resources and batch size, declared here; a section's ``resources`` keys override
    declared: ClassVar[Resources] = declare()

    def __init__(self, section: StageSection):
        self.section = section

    @property
    def cache_name(self) -> str:
        """Which cross-run cache the stage's rows share (stages of one kind share one)."""
        return self.name

    @property
    def resources(self) -> Resources:
        return resolve_resources(self.declared, self.section.resources)

    @property
    @abc.abstractmethod
    def schema(self) -> pa.Schema: ...

    @abc.abstractmethod
    def requested(self) -> dict[str, Any]:
        """The settings that change this stage's rows, as asked for."""

    def resolve(self, ctx: Context) -> dict[str, Any]:
        """The same settings as they will be used (may probe an endpoint; runs once, only
        when work is pending). Default: as requested."""
        return self.requested()

    def check_input(self, rows: int) -> None:  # noqa: B027 (optional hook)
        """On the driver, before the plan: refuse an input the stage cannot make sense of
        (raise ValueError naming why; a filter refuses an empty pool)."""

    def adopt(self, resolved: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Take settings resolved earlier (a finished plan) without resolving again."""

    @abc.abstractmethod
    def open(self) -> BatchWorker:
        """On a worker: build what processing needs (a client, a model), once."""

    def row_defaults(self) -> dict[str, Any]:
        """Values of the stage's non-nullable columns for rows it could not make."""
        return {}

    def failed_rows(self, ids: Sequence[str], error: str, kind: str = "task") -> pa.Table:
        base = self.row_defaults()
        rows = [{**base, "id": i, "status": "failed", "error": error[:2000], "error_kind": kind}
                for i in ids]
        return rows_table(rows, self.schema, _zeros(self.schema))

    def summarize(self, table: pa.Table) -> dict[str, Any]:
        """Stage-specific summary fields from all its rows (``summary_columns`` + engine's)."""
        return {}

    def markdown(self, summary: Mapping[str, Any]) -> str:
        """The stage's Prefect artifact: the engine's counts table unless overridden."""
        from gleaner.engine.summary import counts_markdown

        return counts_markdown(summary)


def _zeros(schema: pa.Schema) -> dict[str, Any]:
    """Neutral values for non-nullable columns a failed row has no value for."""
    out: dict[str, Any] = {}
    for f in schema:
        if f.nullable:
            continue
        if pa.types.is_integer(f.type) or pa.types.is_floating(f.type):
            out[f.name] = 0
        elif pa.types.is_boolean(f.type):
            out[f.name] = False
        elif pa.types.is_string(f.type):
            out[f.name] = ""
    return out


class LLMStage(Stage):
    """A stage whose rows come from an OpenAI-compatible endpoint, through one client contract:
    SDK back-off, the cluster-wide RPM/TPM limiter (one named Ray actor per endpoint and
    model), per-batch concurrency, fatal errors that stop the stage, token accounting."""

    # limiter actor names (by endpoint+model) of the endpoints with rpm/tpm, each with how
    # many workers share its limits while its actor starts; set by the engine
    limiters: dict[str, int] = {}  # noqa: RUF012 (replaced per instance by the engine)
    # Set on the driver by the Batch API runner (gleaner.engine.batch_api) while it replays
    # the stage's worker: clients answering from the provider's batch output.
    client_factory: Any = None

    @property
    @abc.abstractmethod
    def endpoint(self) -> EndpointConfig: ...

    def endpoints(self) -> list[EndpointConfig]:
        """Every endpoint+model the stage calls (each gets its own cluster-wide bucket)."""
        return [self.endpoint]

    def price(self, config: GleanerConfig) -> PriceConfig | None:
        return config.prices.get(self.endpoint.model)

    def uses_batch_api(self) -> bool:
        """An endpoint says ``api: batch``: the engine runs the stage through the Batch API
        (a stage's endpoints share one ``api``: the scorer's two models come from one
        endpoint section)."""
        return any(e.api == "batch" for e in self.endpoints())

    def client(self, endpoint: EndpointConfig | None = None, sharing: Any = None) -> Any:
        """The shared LLM client for one of this stage's endpoints (call on the worker);
        ``sharing``: a client of the same batch whose requests-in-flight cap this one shares."""
        endpoint = endpoint or self.endpoint
        if self.client_factory is not None:
            return self.client_factory(endpoint)
        return self.live_client(endpoint, sharing)

    def live_client(self, endpoint: EndpointConfig, sharing: Any = None) -> Any:
        """A client that calls the endpoint: SDK back-off, the cluster-wide buckets."""
        from gleaner.llm.client import LLMClient
        from gleaner.llm.ratelimit import RayRateLimiter, limiter_name

        name = limiter_name(endpoint.base_url or "", endpoint.model)
        limiter = RayRateLimiter(name, rpm=endpoint.rpm, tpm=endpoint.tpm,
                                 shares=self.limiters[name]) if name in self.limiters else None
        return LLMClient(endpoint, limiter=limiter, concurrency=self.resources.concurrency,
                         shares_concurrency_with=sharing)

    async def probe(self, client: Any) -> dict[str, Any]:
        """One cheap real request before any batch: a rejected key or an unknown model stops
        the stage here, after one request. Returns what it learnt (for ``resolve``)."""
        await client.chat([{"role": "user", "content": "Say OK."}], max_tokens=1)
        return {}

    def resolve(self, ctx: Context) -> dict[str, Any]:
        self.run_probe(ctx)
        return self.requested()

    def run_probe(self, ctx: Context) -> dict[str, Any]:
        from gleaner.llm.client import LLMClient, LLMError

        async def go() -> tuple[dict[str, Any], dict[str, int]]:
            async with LLMClient(self.endpoint, concurrency=1) as client:
                try:
                    learnt = await self.probe(client)
                finally:
                    usage = client.usage.as_dict()
                return learnt, usage

        try:
            learnt, usage = asyncio.run(go())
        except LLMError as error:
            from gleaner.engine.failures import FatalStageError

            raise FatalStageError(f"{self.name}: the endpoint does not answer: {error}",
                                  error.kind) from None
        ctx.add_usage({k: usage.get(k, 0) for k in ("requests", "prompt_tokens",
                                                     "completion_tokens")})
        return learnt


class AsyncBatchWorker:
    """A BatchWorker whose processing is a coroutine over one LLM client per batch."""

    def __init__(self, stage: LLMStage):
        self.stage = stage

    async def aprocess(self, rows: pa.Table, client: Any) -> pa.Table:
        raise NotImplementedError

    def process(self, rows: pa.Table) -> pa.Table:
        from gleaner.llm.client import run_on_worker_loop

        async def go() -> pa.Table:
            async with self.stage.client() as client:
                return await self.aprocess(rows, client)

        return run_on_worker_loop(go())

    def close(self) -> None:
        return None
