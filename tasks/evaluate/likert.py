"""LIMA's absolute evaluation: every answer rated on a 6-point helpfulness scale, per model.

LIMA (Zhou et al. 2023, "LIMA: Less Is More for Alignment", Section 5 and Appendix D) asks
ChatGPT to grade the helpfulness of each of 5 sampled responses per test prompt on a 1-6
Likert scale and reports the average with a 95 % two-sided confidence interval. Here the
judge is ``evaluate.endpoint``; the prompt is Appendix D's template (:data:`LIKERT_TEMPLATE`,
docs/methods.md says what is verbatim). A row is one (model, test set, prompt, sample,
answer); the judge's last line holding only a digit 1-6 is the rating; an answer without
one is asked again (``evaluate.likert.parse_retries``) and then a failed row with the raw
text (``error_kind = parse``), never a rating. Per model and test set: the mean over
prompts of each prompt's mean rating, and a percentile bootstrap interval that resamples
prompts (:func:`bootstrap_ci`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from gleaner import layout
from gleaner.config import EndpointConfig, GleanerConfig, StageSection
from gleaner.engine import Call, Conversation, LLMRowStage, ParseFailure, run_stage, stage_schema
from gleaner.engine.stage import declare, resolve_resources
from gleaner.engine.summary import estimate_cost
from gleaner.llm.client import LLMClient
from gleaner.llm.offline import OFFLINE_CONCURRENCY
from gleaner.store import Store

# LIMA's Appendix D template (the prompt ChatGPT was given), with the paper's typography.
LIKERT_TEMPLATE = (
    "You are evaluating a response that has been submitted for a particular task, using a "
    "specific set of standards. Below is the data:\n"
    "[BEGIN DATA]\n"
    "***\n"
    "[Task]: {task}\n"
    "***\n"
    "[Submission]: {submission}\n"
    "***\n"
    "[Criterion]: helpfulness:\n"
    "\"1\": \"Not helpful - The generated text is completely irrelevant, unclear, or "
    "incomplete. It does not provide any useful information to the user.\"\n"
    "\"2\": \"Somewhat helpful - The generated text has some relevance to the user\u2019s "
    "question, but it may be unclear or incomplete. It provides only partial information, or "
    "the information provided may not be useful for the user\u2019s needs.\"\n"
    "\"3\": \"Moderately helpful - The generated text is relevant to the user\u2019s question, "
    "and it provides a clear and complete answer. However, it may lack detail or explanation "
    "that would be helpful for the user.\"\n"
    "\"4\": \"Helpful - The generated text is quite relevant to the user\u2019s question, and it "
    "provides a clear, complete, and detailed answer. It offers additional information or "
    "explanations that are useful for the user. However, some of the points of the response "
    "are somewhat repetitive or could be combined for greater clarity and concision\"\n"
    "\"5\": \"Very helpful - The generated text is highly relevant to the user\u2019s question, "
    "and it provides a clear, complete, and detailed answer. It offers additional information, "
    "explanations, or analogies that are not only useful but also insightful and valuable to "
    "the user. However, the structured of the response is not well-organized and there is no "
    "clear progression or logical sequence of different points in the response.\"\n"
    "\"6\": \"Highly helpful - The generated text provides a clear, complete, and detailed "
    "answer. It offers additional information or explanations that are not only useful but "
    "also insightful and valuable to the user. The response is also in a logical and "
    "easy-to-follow manner by explicitly using headings, bullet points, or numbered lists to "
    "break up the information and make it easier to read.\"\n"
    "***\n"
    "[END DATA]\n"
    "Does the submission meet the criterion? First, write out in a step by step manner your "
    "reasoning about the criterion to be sure that your conclusion is correct. Avoid simply "
    "stating the correct answers at the outset. Then print the choice only from "
    "\u201c1, 2, 3, 4, 5, 6\u201d (without quotes or punctuation) on its own line corresponding "
    "to the correct answer. At the end, repeat just the selected choice again by itself on a "
    "new line."
)
PROMPT_VERSION = hashlib.sha256(LIKERT_TEMPLATE.encode()).hexdigest()[:12]
SCALE = (1, 6)
LEVELS = {1: "Not helpful", 2: "Somewhat helpful", 3: "Moderately helpful", 4: "Helpful",
          5: "Very helpful", 6: "Highly helpful"}

# llama.cpp GBNF: the answer is one digit 1-6 (a 135M judge writes prose that never ends in a
# choice line otherwise); parse_likert reads it as a choice line.
LIKERT_GRAMMAR = "root ::= [1-6]\n"

_EDGE = " \t*_`\"'\u201c\u201d\u2018\u2019()[]{}.:!"
_LABEL = re.compile(r"^(?:final\s+)?(?:choice|rating|score|answer)\s*[:=\-]?\s*", re.IGNORECASE)


def likert_messages(question: str, answer: str) -> list[dict[str, str]]:
    """Appendix D's template as the one user message (the paper gives no system message)."""
    return [{"role": "user",
             "content": LIKERT_TEMPLATE.format(task=question, submission=answer)}]


def parse_likert(text: str) -> int | None:
    """The last line that holds only a number (quotes, emphasis, a trailing period and a
    ``Choice:``/``Rating:`` label allowed): the rating when it is 1-6, else None."""
    for line in reversed(text.splitlines()):
        core = _LABEL.sub("", line.strip(_EDGE)).strip(_EDGE)
        if core.isdigit():
            value = int(core)
            return value if SCALE[0] <= value <= SCALE[1] else None
    return None


def read_likert(completion: Any) -> int:
    rating = parse_likert(completion.text)
    if rating is None:
        raise ParseFailure("no choice 1-6 on a line of its own in the judge's answer")
    return rating


# ---- what is rated -------------------------------------------------------------------------
@dataclass(frozen=True)
class Rated:
    """One answer to rate: which model gave it, to which prompt of which test set, which
    sample of that prompt (0: the answer the pairwise judge sees)."""

    model: str
    test_set: str
    key: str
    sample: int
    question: str
    answer: str

    @property
    def id(self) -> str:
        blob = json.dumps([self.model, self.test_set, self.key, self.sample, self.question,
                           self.answer], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


REQUEST_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("test_set", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("sample", pa.int32(), nullable=False),
    pa.field("question", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
])
RATING_SCHEMA = stage_schema(
    pa.field("model", pa.string(), nullable=False),
    pa.field("test_set", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("sample", pa.int32(), nullable=False),
    pa.field("rating", pa.int32()),  # 1-6, null unless ok
    pa.field("raw", pa.string()),  # the judge's last answer
    pa.field("judge_model", pa.string(), nullable=False),
    llm=True,
)


def requests_table(items: Iterable[Rated]) -> pa.Table:
    """One row per distinct item (an exact repeat is rated once)."""
    rows = {item.id: {"id": item.id, "model": item.model, "test_set": item.test_set,
                      "key": item.key, "sample": item.sample, "question": item.question,
                      "answer": item.answer} for item in items}
    return pa.Table.from_pylist(list(rows.values()), schema=REQUEST_SCHEMA)


# ---- the stage -----------------------------------------------------------------------------
@dataclass(frozen=True)
class LikertSettings:
    max_tokens: int
    parse_retries: int
    grammar: bool
    temperature: float = 0.0


def likert_settings(config: GleanerConfig) -> LikertSettings:
    """What the judge is asked with; gleaner's own offline judge answers under the grammar."""
    likert, offline = config.evaluate.likert, bool(config.evaluate.endpoint.local_server)
    return LikertSettings(
        max_tokens=min(likert.max_tokens, likert.offline_max_tokens) if offline
        else likert.max_tokens,
        parse_retries=likert.parse_retries,
        grammar=likert.grammar if likert.grammar is not None else offline)


def likert_call(question: str, answer: str, settings: LikertSettings) -> Call:
    options = {"extra_body": {"grammar": LIKERT_GRAMMAR}} if settings.grammar else {}
    return Call(read_likert, likert_messages(question, answer), max_tokens=settings.max_tokens,
                temperature=settings.temperature, options=options,
                parse_retries=settings.parse_retries)


class LikertStage(LLMRowStage):
    """LIMA's 6-point helpfulness rating of both models' answers of one comparison."""

    declared = declare(batch_size=64, concurrency=16)

    follows_input = True  # answers regenerated: rate what changed, reuse the rest
    input_columns = ("id", "model", "test_set", "key", "sample", "question", "answer")
    summary_columns = ("rating",)
    description = "LIMA 6-point helpfulness ratings"

    def __init__(self, config: GleanerConfig, comparison: str):
        likert = config.evaluate.likert
        offline = bool(config.evaluate.endpoint.local_server)
        own = resolve_resources(self.declared, likert.resources)
        resources = likert.resources if not offline else likert.resources.model_copy(
            update={"concurrency": min(own.concurrency or OFFLINE_CONCURRENCY,
                                       OFFLINE_CONCURRENCY)})
        super().__init__(StageSection(
            resources=resources, cache=likert.cache, force=likert.force or config.evaluate.force,
            retry_failed=likert.retry_failed, max_failed_share=likert.max_failed_share))
        self.judge = config.evaluate.endpoint
        self.settings = likert_settings(config)
        self.name = layout.likert_stage(comparison)
        self.input_stage = layout.likert_requests_stage(comparison)

    @property
    def cache_name(self) -> str:
        return "likert"  # one cache for every comparison

    @property
    def endpoint(self) -> EndpointConfig:
        return self.judge

    @property
    def schema(self) -> pa.Schema:
        return RATING_SCHEMA

    def requested(self) -> dict[str, Any]:
        s = self.settings
        return {"model": self.judge.model, "prompt_version": PROMPT_VERSION,
                "max_tokens": s.max_tokens, "temperature": s.temperature,
                "parse_retries": s.parse_retries, "grammar": s.grammar}

    async def probe(self, client: LLMClient) -> dict[str, Any]:
        """One real request: key, model and endpoint, before any batch."""
        extra = {"extra_body": {"grammar": LIKERT_GRAMMAR}} if self.settings.grammar else {}
        await client.chat([{"role": "user", "content": "Say OK."}], max_tokens=1, **extra)
        return {}

    def conversation(self, row: dict[str, Any]) -> Conversation:
        reading = yield likert_call(row["question"], row["answer"], self.settings)
        return {"rating": reading.value}

    def carried(self, row: dict[str, Any]) -> dict[str, Any]:
        return {k: row[k] for k in ("model", "test_set", "key", "sample")}

    def row_defaults(self) -> dict[str, Any]:
        return {"judge_model": self.judge.model, "model": "", "test_set": "", "key": "",
                "sample": 0}

    def summarize(self, table: pa.Table) -> dict[str, Any]:
        ratings = [r for r, s in zip(table.column("rating").to_pylist(),
                                     table.column("status").to_pylist(), strict=True)
                   if s == "ok" and r is not None]
        return {"rated": len(ratings),
                "mean_rating": round(float(np.mean(ratings)), 4) if ratings else None}


# ---- the numbers ---------------------------------------------------------------------------
def bootstrap_ci(prompt_means: Sequence[float], resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float] | None:
    """The percentile bootstrap interval of the mean over prompts: ``resamples`` draws of as
    many prompts with replacement (numpy's PCG64 seeded by ``seed``), the mean of each draw,
    and the draws' (1 - level)/2 and (1 + level)/2 quantiles. None without prompts."""
    values = np.asarray(prompt_means, dtype=np.float64)
    if values.size == 0:
        return None
    rng = np.random.default_rng(seed)
    draws = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def score(rows: Sequence[dict[str, Any]], resamples: int, seed: int) -> dict[str, Any]:
    """Mean and 95 % interval of rated rows (``key``, ``status``, ``rating``): each prompt's
    samples averaged, then the prompts; failed rows counted apart, never averaged in."""
    by_prompt: dict[str, list[int]] = defaultdict(list)
    failed = 0
    for row in rows:
        if row["status"] == "ok" and row["rating"] is not None:
            by_prompt[row["key"]].append(row["rating"])
        else:
            failed += 1
    means = [float(np.mean(r)) for r in by_prompt.values()]
    interval = bootstrap_ci(means, resamples, seed)
    return {"mean": _round(np.mean(means)) if means else None,
            "ci_low": _round(interval[0]) if interval else None,
            "ci_high": _round(interval[1]) if interval else None,
            "prompts": len(means), "rated": sum(len(r) for r in by_prompt.values()),
            "failed": failed}


def likert_scores(table: pa.Table, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Per model: per test set and overall (every prompt of every set), from the ratings."""
    rows = table.select(["model", "test_set", "key", "status", "rating"]).to_pylist()
    models: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        models[row["model"]][row["test_set"]].append(row)
    out: dict[str, Any] = {}
    for model, sets in models.items():
        pooled = [{**r, "key": f"{name}\x00{r['key']}"} for name, members in sets.items()
                  for r in members]
        out[model] = {"test_sets": {name: score(members, resamples, seed)
                                    for name, members in sets.items()},
                      "overall": score(pooled, resamples, seed)}
    return out


def _show(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def likert_markdown(summary: dict[str, Any]) -> str:
    """One row per model and test set (and each model's overall row)."""
    lines = [f"### Absolute evaluation: LIMA's 6-point helpfulness (judge {summary['judge_model']}"
             f", {summary['samples']} sample(s) per prompt)", "",
             "| model | test set | mean (1-6) | 95 % CI | prompts | rated | failed |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for model, result in summary["models"].items():
        for name, part in [*result["test_sets"].items(), ("**overall**", result["overall"])]:
            interval = "n/a" if part["ci_low"] is None else \
                f"{_show(part['ci_low'])}–{_show(part['ci_high'])}"
            lines.append(f"| {model} | {name} | {_show(part['mean'])} | {interval} | "
                         f"{part['prompts']} | {part['rated']} | {part['failed']} |")
    lines += ["", "Mean over prompts of each prompt's mean rating; 95 % CI: percentile "
              f"bootstrap over prompts ({summary['resamples']} resamples, seed "
              f"{summary['seed']}); failed ratings are counted, never averaged in."]
    return "\n".join(lines) + "\n"


# ---- the step ------------------------------------------------------------------------------
def rate_answers(store: Store, run_id: str, config: GleanerConfig, comparison: str,
                 items: Sequence[Rated], samples: int) -> dict[str, Any]:
    """Every item rated (an engine stage: needs a judge endpoint, Ray and a flow run); the
    scores per model and test set, with the judge's tokens and cost. ``samples``: answers
    per prompt (for the report)."""
    likert = config.evaluate.likert
    stage = LikertStage(config, comparison)
    requests = requests_table(items)
    store.clear_stage(run_id, stage.input_stage)
    store.write_part(run_id, stage.input_stage, 0, requests)
    if requests.num_rows:
        stage_summary = run_stage(stage, config, run_id)
        table = store.read_stage(run_id, stage.name, schema=RATING_SCHEMA)
    else:
        stage_summary, table = {"prompt_tokens": 0, "completion_tokens": 0}, \
            RATING_SCHEMA.empty_table()
    price = config.prices.get(config.evaluate.endpoint.model)
    prompt_tokens = int(stage_summary.get("prompt_tokens") or 0)
    completion_tokens = int(stage_summary.get("completion_tokens") or 0)
    summary = {"judge_model": config.evaluate.endpoint.model, "prompt_version": PROMPT_VERSION,
               "samples": samples,
               "resamples": likert.resamples, "seed": likert.seed,
               "models": likert_scores(table, likert.resamples, likert.seed),
               "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
               "cost_usd": estimate_cost(price, prompt_tokens, completion_tokens)}
    summary["markdown"] = likert_markdown(summary)
    return summary
