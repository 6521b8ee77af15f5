"""AlpaGasus rating: the prompt, the score parser, and rating one batch of examples.

Plain functions first (no Prefect, no Ray, no paths): :func:`build_prompt`,
:func:`parse_score`, :func:`rate_batch`. Then the unit of retry and
checkpointing, :func:`rate_batch_task`: a Prefect task that rates one batch
and writes it as one Parquet part (and its fresh ratings to the cache).

Two modes:

- ``explain`` (the paper's): the model writes the score on the first line and
  an explanation after it; the whole answer is kept in ``raw``.
- ``score-only``: one completion token with top_logprobs; the score is the
  expected value over the tokens "0".."5". One completion token per example.
  When the endpoint sends no logprobs the example falls back to ``explain``
  (and the row says so in ``mode``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import posixpath
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from gleaner.config import EndpointConfig
from gleaner.llm.client import SCORE_TOKENS_0_5, LLMClient, LLMError, expected_score
from gleaner.llm.ratelimit import RayRateLimiter
from gleaner.store import Store

Mode = Literal["explain", "score-only"]
MODES: tuple[Mode, ...] = ("explain", "score-only")
log = logging.getLogger("gleaner.rate")

# SPEC.md §1 (AlpaGasus Fig. 3), verbatim; [dimension] is a parameter.
SYSTEM_PROMPT = (
    "We would like to request your feedback on the performance of AI assistant in response "
    "to the instruction and the given input displayed following."
)
USER_TEMPLATE = """###Instruction:
{instruction}

### Input:
{input}

### Response:
{output}

Please rate according to the {dimension} of the response to the instruction and the input. \
Each assistant receives a score on a scale of 0 to 5, where a higher score indicates higher \
level of the {dimension}. Please first output a single line containing value indicating the \
scores. In the subsequent line, please provide a comprehensive explanation of your evaluation, \
avoiding any potential bias."""

PLACEHOLDER = re.compile(r"\{(instruction|input|output|dimension)\}")
SCORE_MIN, SCORE_MAX = 0.0, 5.0

RATING_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("dimension", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("score", pa.float64()),  # null unless status == "ok"
        pa.field("status", pa.string(), nullable=False),  # ok | failed
        pa.field("raw", pa.string()),
        pa.field("attempts", pa.int32(), nullable=False),  # HTTP requests spent on this example
        pa.field("error", pa.string()),
        pa.field("error_kind", pa.string()),  # parse | transient | permanent | task
        pa.field("prompt_tokens", pa.int64(), nullable=False),
        pa.field("completion_tokens", pa.int64(), nullable=False),
        pa.field("latency_ms", pa.float64(), nullable=False),
        pa.field("cached", pa.bool_(), nullable=False),  # reused from the rating cache
    ]
)


# ---- prompt ---------------------------------------------------------------------
@dataclass(frozen=True)
class RatingPrompt:
    """A rating prompt: system text, a user template and the dimension it asks about."""

    system: str
    user_template: str
    dimension: str

    @property
    def version(self) -> str:
        """Hash of the template text: ratings made with another prompt are never reused."""
        digest = hashlib.sha256(f"{self.system}\x00{self.user_template}".encode()).hexdigest()
        return digest[:12]

    def user_message(self, row: Mapping[str, Any]) -> str:
        values = {
            "instruction": str(row.get("instruction") or ""),
            "input": str(row.get("input") or ""),
            "output": str(row.get("output") or ""),
            "dimension": self.dimension,
        }
        # One pass over the known placeholders: braces in the data or elsewhere stay as they are.
        return PLACEHOLDER.sub(lambda m: values[m.group(1)], self.user_template)

    def messages(self, row: Mapping[str, Any]) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": self.user_message(row)},
        ]


def build_prompt(
    dimension: str = "accuracy", template_file: str | Path | None = None
) -> RatingPrompt:
    """The AlpaGasus prompt for a dimension, or a user template file replacing the user message.

    A template file is plain text with ``{instruction}``, ``{input}``, ``{output}``
    and ``{dimension}`` placeholders (other braces are left alone).
    """
    dimension = dimension.strip()
    if not dimension:
        raise ValueError("the rating dimension must not be empty")
    template = USER_TEMPLATE
    if template_file is not None:
        path = Path(template_file)
        try:
            template = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"cannot read rating template {path}: {error.strerror}") from error
        missing = {"instruction", "output"} - set(PLACEHOLDER.findall(template))
        if missing:
            raise ValueError(
                f"rating template {path} lacks the placeholder(s) "
                + ", ".join("{" + m + "}" for m in sorted(missing))
            )
    return RatingPrompt(SYSTEM_PROMPT, template, dimension)


# ---- parsing --------------------------------------------------------------------
NUMBER = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class ParsedScore:
    score: float | None
    reason: str | None = None  # why there is no score

    @property
    def ok(self) -> bool:
        return self.score is not None


def parse_score(text: str | None) -> ParsedScore:
    """The score on the first line that has a number ("4.5", "Score: 4", "4/5", "**4**").

    Outside 0–5 or no number at all is a parse failure, never a zero.
    """
    if not text or not text.strip():
        return ParsedScore(None, "empty answer")
    for line in text.splitlines():
        match = NUMBER.search(line.replace("*", " "))
        if match is None:
            continue
        value = float(match.group(1))
        if not SCORE_MIN <= value <= SCORE_MAX:
            return ParsedScore(None, f"score {match.group(1)} outside {SCORE_MIN:g}-{SCORE_MAX:g}")
        return ParsedScore(value)
    first = text.strip().splitlines()[0][:80]
    return ParsedScore(None, f"no number in the answer (first line: {first!r})")


# ---- rating a batch -------------------------------------------------------------
@dataclass
class FallbackNotice:
    """Score-only needs logprobs; when an endpoint sends none, fall back and say so once."""

    fell_back: bool = False

    def note(self, model: str) -> None:
        if not self.fell_back:
            self.fell_back = True
            log.warning(
                "endpoint model %r returned no logprobs: score-only mode falls back to explain",
                model,
            )


@dataclass
class RateOptions:
    parse_retries: int = 2
    explain_max_tokens: int = 256
    top_logprobs: int = 20


def _row(
    example_id: str, prompt: RatingPrompt, model: str, mode: str, **fields: Any
) -> dict[str, Any]:
    row = {
        "id": example_id,
        "dimension": prompt.dimension,
        "model": model,
        "prompt_version": prompt.version,
        "mode": mode,
        "score": None,
        "status": "failed",
        "raw": None,
        "attempts": 0,
        "error": None,
        "error_kind": None,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "latency_ms": 0.0,
        "cached": False,
    }
    row.update(fields)
    return row


async def rate_one(
    example: Mapping[str, Any],
    client: LLMClient,
    prompt: RatingPrompt,
    mode: Mode,
    options: RateOptions,
    notice: FallbackNotice,
) -> dict[str, Any]:
    """Rate one example; the row is ``ok`` with a score or ``failed`` with the reason."""
    messages = prompt.messages(example)
    mode_used: Mode = "explain" if notice.fell_back else mode
    attempts = prompt_tokens = completion_tokens = 0
    latency_ms = 0.0
    raw: str | None = None
    reason = "not rated"
    tries = 0
    while tries <= options.parse_retries:
        tries += 1
        try:
            if mode_used == "score-only":
                completion = await client.chat(
                    messages, max_tokens=1, logprobs=True, top_logprobs=options.top_logprobs
                )
            else:
                completion = await client.chat(messages, max_tokens=options.explain_max_tokens)
        except LLMError as error:
            return _row(
                example["id"], prompt, client.model, mode_used, raw=raw,
                attempts=attempts + error.attempts, error=str(error), error_kind=error.kind,
                prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                latency_ms=latency_ms,
            )
        attempts += completion.attempts
        prompt_tokens += completion.prompt_tokens
        completion_tokens += completion.completion_tokens
        latency_ms += completion.latency_ms
        if mode_used == "score-only":
            if completion.top_logprobs is None:
                notice.note(client.model)
                mode_used = "explain"
                tries -= 1  # the endpoint's limitation, not a parse failure
                continue
            first = completion.top_logprobs[0]
            raw = json.dumps(first, sort_keys=True)
            score = expected_score(first, SCORE_TOKENS_0_5)
            reason_none = None if score is not None else "no score token 0-5 in top_logprobs"
            parsed = ParsedScore(score, reason_none)
        else:
            raw = completion.text
            parsed = parse_score(completion.text)
        if parsed.ok:
            return _row(
                example["id"], prompt, client.model, mode_used, score=parsed.score, status="ok",
                raw=raw, attempts=attempts, prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens, latency_ms=latency_ms,
            )
        reason = parsed.reason or "unparseable"
    return _row(
        example["id"], prompt, client.model, mode_used, raw=raw, attempts=attempts,
        error=f"parse failure after {tries} answers: {reason}", error_kind="parse",
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, latency_ms=latency_ms,
    )


async def rate_batch(
    rows: Sequence[Mapping[str, Any]],
    client: LLMClient,
    prompt: RatingPrompt,
    mode: Mode,
    options: RateOptions | None = None,
    notice: FallbackNotice | None = None,
) -> pa.Table:
    """Rate every example of a batch concurrently (the client's semaphore caps it).

    Each example becomes exactly one row, in input order: ``ok`` with a score,
    or ``failed`` with the error; nothing is dropped.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    options = options or RateOptions()
    notice = notice or FallbackNotice()
    results = await asyncio.gather(
        *(rate_one(row, client, prompt, mode, options, notice) for row in rows)
    )
    return pa.Table.from_pylist(list(results), schema=RATING_SCHEMA)


def failed_rows(
    ids: Sequence[str], prompt: RatingPrompt, model: str, mode: str, error: str, kind: str = "task"
) -> pa.Table:
    """Rows for examples a batch could not rate at all (its task failed after every retry)."""
    rows = [_row(i, prompt, model, mode, error=error, error_kind=kind) for i in ids]
    return pa.Table.from_pylist(rows, schema=RATING_SCHEMA)


# ---- the unit of retry and checkpointing --------------------------------------------
STAGE = "rate"


class BatchUnavailable(RuntimeError):
    """Every request of a batch failed transiently (endpoint down, quota): retry the batch later."""


@dataclass
class RateJob:
    """What every batch task of one rating run needs. Holds no secrets (keys come from env)."""

    run_id: str
    store_url: str
    store_options: dict[str, Any]
    endpoint: EndpointConfig
    prompt: RatingPrompt
    mode: Mode
    options: RateOptions
    limiter: str | None = None  # name of the cluster-wide rate-limit actor
    cache_dir: str | None = None  # where freshly made ok ratings are shared with later runs

    def store(self) -> Store:
        return Store(self.store_url, self.store_options)


def write_batch(job: RateJob, index: int, fresh: pa.Table, cached: pa.Table | None = None) -> dict:
    """Checkpoint one batch: cache first, then the part (a crash between the two costs nothing)."""
    store = job.store()
    if job.cache_dir is not None:
        ok = fresh.filter(pc.equal(fresh["status"], "ok"))
        if ok.num_rows:
            name = f"{job.run_id}-{index:05d}.parquet"
            store.write_table(posixpath.join(job.cache_dir, name), ok)
    table = pa.concat_tables([cached, fresh]) if cached is not None and cached.num_rows else fresh
    store.write_part(job.run_id, STAGE, index, table)
    return batch_summary(index, table)


def batch_summary(index: int, table: pa.Table) -> dict[str, Any]:
    fresh = table.filter(pc.invert(table["cached"]))
    return {
        "index": index,
        "rows": table.num_rows,
        "ok": pc.sum(pc.equal(table["status"], "ok")).as_py() or 0,
        "failed": pc.sum(pc.equal(table["status"], "failed")).as_py() or 0,
        "cached": table.num_rows - fresh.num_rows,
        "requests": pc.sum(fresh["attempts"]).as_py() or 0,
        "prompt_tokens": pc.sum(fresh["prompt_tokens"]).as_py() or 0,
        "completion_tokens": pc.sum(fresh["completion_tokens"]).as_py() or 0,
    }


def all_transient_failures(table: pa.Table) -> bool:
    kinds = table["error_kind"].to_pylist()
    return bool(kinds) and all(k == "transient" for k in kinds)


@task(
    name="rate-batch",
    task_run_name="rate-batch-{index:05d}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
)
async def rate_batch_task(
    index: int, job: RateJob, rows: list[dict[str, Any]], cached: pa.Table | None = None
) -> dict[str, Any]:
    """Rate one batch and write its part; raises (Prefect retries) only if nothing got through."""
    limiter = RayRateLimiter(job.limiter) if job.limiter else None
    notice = FallbackNotice()
    started = time.perf_counter()
    async with LLMClient(job.endpoint, limiter=limiter) as client:
        fresh = await rate_batch(rows, client, job.prompt, job.mode, job.options, notice)
    rating_s = time.perf_counter() - started
    if notice.fell_back:
        get_run_logger().warning(
            "batch %05d: the endpoint returned no logprobs; score-only fell back to explain", index
        )
    if all_transient_failures(fresh):
        first = fresh["error"][0].as_py()
        raise BatchUnavailable(
            f"batch {index:05d}: all {fresh.num_rows} examples failed; first: {first}"
        )
    summary = write_batch(job, index, fresh, cached)
    summary["rating_s"] = rating_s  # time inside rate_batch: the rest is orchestration
    return summary
