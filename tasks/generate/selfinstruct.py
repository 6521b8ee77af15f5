"""Alpaca's self-instruct (SPEC §8) as a round stage: the pool grows from the seed tasks.

Each round sends ``requests_per_round`` requests at once (one async batch); each request shows
Alpaca's prompt and ``num_prompt_instructions`` tasks sampled from the pool (seeds first; kept
tasks join it) and asks the model to continue the numbered list. The answers are then settled
in request order, task by task, as Alpaca's loop did: parse, Alpaca's filters, and the ROUGE-L
near-duplicate filter against every instruction in the pool at that moment (so a task kept
earlier in the same round counts). Every candidate is a row of its request with ``kept`` or
``filtered`` and its reason; a request that failed is a row with its error.

Determinism: round r's sampling draws from ``numpy.random.default_rng([seed, r])`` over the
pool as rounds < r left it, and the state is rebuilt from the parts alone, so a killed run
resumes at the first unwritten round with the pool an uninterrupted run had there: given the
same answers it reaches the same pool.

Output: the kept tasks become the run's ``ingest`` (EXAMPLE_SCHEMA; ``source`` names the
generator, the model and the round; the seeds are not part of it), rewritten from the parts
when the run completes.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from gleaner import layout
from gleaner.config import EndpointConfig, GenerateConfig, GleanerConfig
from gleaner.engine import rows_table, stage_schema
from gleaner.engine.llm_rows import Call, Conversation, converse
from gleaner.engine.rounds import RoundStage, run_rounds
from gleaner.engine.stage import declare
from gleaner.llm.client import LLMClient
from gleaner.llm.offline import OfflineRole, maker_settings
from gleaner.registry import register
from gleaner.schema import Example
from gleaner.store import Store
from gleaner.tasks.generate import as_ingest
from gleaner.tasks.generate.filters import REASONS, filters_version, task_filter
from gleaner.tasks.generate.parse import parse_answer, strip_echo
from gleaner.tasks.generate.prompt import GenerationPrompt, load_prompt
from gleaner.tasks.generate.rouge import RougeIndex, tokenize
from gleaner.tasks.generate.seeds import Task, load_seed_tasks, seeds_fingerprint
from gleaner.tasks.ingest.ingest import source_options

GENERATOR = "alpaca-self-instruct"
TASK_TYPE = pa.struct([
    pa.field("position", pa.int32()),  # its number in the answer's list
    pa.field("instruction", pa.string()),
    pa.field("input", pa.string()),
    pa.field("output", pa.string()),
    pa.field("status", pa.string()),  # kept | filtered
    pa.field("reason", pa.string()),  # why filtered (gleaner.tasks.generate.filters.REASONS)
    pa.field("rouge", pa.float64()),  # near_duplicate: ROUGE-L F of the closest pool entry
    pa.field("similar_to", pa.string()),  # ... and that entry's instruction
    pa.field("example_id", pa.string()),  # kept: its id in the run's ingest
])
REQUEST_SCHEMA = stage_schema(
    pa.field("round", pa.int32(), nullable=False),
    pa.field("request", pa.int32(), nullable=False),
    pa.field("context", pa.list_(pa.int32()), nullable=False),  # pool entries shown
    pa.field("finish_reason", pa.string()),
    pa.field("answer", pa.string()),  # the model's text, as returned
    pa.field("tasks", pa.list_(TASK_TYPE), nullable=False),
    llm=True,
)


class Pool:
    """The tasks requests sample from (seeds, then kept ones) and the ROUGE-L index over them."""

    def __init__(self, seeds: list[Task], threshold: float):
        self.tasks: list[Task] = []
        self.origins: list[tuple[int, int, int]] = []  # kept ones: (round, request, position)
        self.index = RougeIndex(threshold)
        self.ids: set[str] = set()
        for seed in seeds:
            self.add(seed, tokenize(seed.instruction))
        self.seeds = len(seeds)

    @property
    def generated(self) -> int:
        return len(self.tasks) - self.seeds

    def add(self, task: Task, tokens: list[str], origin: tuple[int, int, int] | None = None,
            example_id: str | None = None) -> None:
        self.tasks.append(task)
        self.index.add(tokens)
        if origin is not None:
            self.origins.append(origin)
        if example_id is not None:
            self.ids.add(example_id)


def read_answer(completion: Any) -> tuple[str, str | None]:
    """The answer as given (parsed into tasks when the round settles) and why it stopped."""
    return completion.text, completion.finish_reason


def request_seed(seed: int, index: int, number: int) -> int:
    """The sampling seed sent with request ``number`` of round ``index`` (31 bits)."""
    digest = hashlib.sha256(f"{seed}:{index}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def example_of(task: Task) -> Example:
    return Example(source="", source_row=0, instruction=task.instruction, input=task.input,
                   output=task.output)


class SelfInstructStage(RoundStage):
    """Alpaca's generator: rounds of self-instruct requests until ``count`` tasks are kept."""

    declared = declare(concurrency=5, retries=2)

    name = layout.GENERATE
    description = "Alpaca self-instruct"
    progress_unit = "kept"

    def __init__(self, section: GenerateConfig, seeds: list[Task], prompt: GenerationPrompt,
                 count: int, seeds_source: str = ""):
        super().__init__(section)
        self.settings = section
        self.prompt = prompt
        self.count = count
        self.seeds_source = seeds_source
        self.seed_tasks = seeds
        self.pool = Pool(seeds, section.rouge_threshold)
        self.rounds = 0
        self.stall = 0  # rounds in a row that kept nothing
        self.outcomes: Counter[str] = Counter()  # kept + every filter reason
        self.rouge_seconds = 0.0  # in the ROUGE-L filter, this process's rounds only
        self.rouge_checks = 0

    # ---- the stage's identity ---------------------------------------------------------------
    @property
    def endpoint(self) -> EndpointConfig:
        return self.settings.endpoint

    @property
    def schema(self) -> pa.Schema:
        return REQUEST_SCHEMA

    def requested(self) -> dict[str, Any]:
        s = self.settings
        return {"generator": GENERATOR, "model": s.endpoint.model, "route": s.route,
                "prompt_version": self.prompt.version, "seeds": seeds_fingerprint(self.seed_tasks),
                "num_prompt_instructions": s.num_prompt_instructions,
                "requests_per_round": s.requests_per_round, "sample_from": s.sample_from,
                "temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens,
                "stop": list(s.stop), "rouge_threshold": s.rouge_threshold,
                "filters": filters_version(s.extra_blacklist), "seed": s.seed,
                "send_seed": s.send_seed}

    async def probe(self, client: LLMClient) -> dict[str, Any]:
        if self.settings.route == "completions":  # a completions-only model has no chat route
            await client.complete("Say OK.", max_tokens=1)
            return {}
        return await super().probe(client)

    # ---- rounds -----------------------------------------------------------------------------
    def stop_reason(self) -> str | None:
        if self.pool.generated >= self.count:
            return "reached"
        if self.settings.max_rounds is not None and self.rounds >= self.settings.max_rounds:
            return "max_rounds"
        if self.stall >= self.settings.stall_rounds:
            return "stalled"
        return None

    def progress_of(self) -> tuple[int, int | None]:
        return min(self.pool.generated, self.count), self.count

    def sample(self, index: int) -> list[list[int]]:
        """The pool entries each request of round ``index`` shows (seeded by seed and round)."""
        rng = np.random.default_rng([self.settings.seed, index])
        size = len(self.pool.tasks) if self.settings.sample_from == "pool" else self.pool.seeds
        k = self.settings.num_prompt_instructions
        return [rng.choice(size, size=k, replace=False).tolist()
                for _ in range(self.settings.requests_per_round)]

    async def ask(self, index: int, client: LLMClient) -> list[dict[str, Any]]:
        picks = self.sample(index)
        return list(await asyncio.gather(*(self._ask_one(client, index, number, context)
                                           for number, context in enumerate(picks))))

    async def _ask_one(self, client: LLMClient, index: int, number: int, context: list[int]
                       ) -> dict[str, Any]:
        row = {"id": f"{index:05d}-{number:03d}", "round": index, "request": number,
               "context": context, "tasks": [], "answer": None, "finish_reason": None}
        out = await converse(self.request(index, number, context), {None: client}, 0, row)
        out.pop("raw")
        return out

    def request(self, index: int, number: int, context: list[int]) -> Conversation:
        """One request of a round: the prompt showing the sampled tasks, answered once (the
        round's tasks are parsed from it when the round settles)."""
        s = self.settings
        text = self.prompt.encode([self.pool.tasks[i] for i in context])
        options: dict[str, Any] = {"top_p": s.top_p, "stop": list(s.stop)}
        if s.send_seed:
            options["seed"] = request_seed(s.seed, index, number)
        messages = None if s.route == "completions" else [{"role": "user", "content": text}]
        reading = yield Call(read_answer, messages, prompt=text if messages is None else None,
                             max_tokens=s.max_tokens, temperature=s.temperature,
                             options=options, parse_retries=0)
        answer, finish_reason = reading.value
        return {"answer": answer, "finish_reason": finish_reason}

    def settle(self, index: int, rows: list[dict[str, Any]]) -> pa.Table:
        kept_before = self.pool.generated
        for row in rows:
            if row["status"] == "ok":
                row["tasks"] = self._decide(index, row)
        self._close_round(kept_before)
        return rows_table(rows, REQUEST_SCHEMA)

    def _decide(self, index: int, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        s, out = self.settings, []
        text = row["answer"] or ""
        if s.route == "chat":
            text = strip_echo(text, s.num_prompt_instructions + 1)
        for candidate in parse_answer(text, s.num_prompt_instructions, row["finish_reason"]):
            task = {"position": candidate.position, "instruction": candidate.instruction,
                    "input": candidate.input, "output": candidate.output, "status": "filtered",
                    "reason": candidate.reason}
            if candidate.parsed:
                task["reason"] = task_filter(candidate.instruction, candidate.output,
                                             s.extra_blacklist)
            if task["reason"] is None:
                self._check_pool(task, (index, row["request"], candidate.position))
            self.outcomes[task["reason"] or "kept"] += 1
            out.append(task)
        return out

    def _check_pool(self, task: dict[str, Any], origin: tuple[int, int, int]) -> None:
        """ROUGE-L against the pool now; kept tasks join it at once (Alpaca's order)."""
        started = time.perf_counter()
        tokens = tokenize(task["instruction"])
        match = self.pool.index.best_match(tokens)
        self.rouge_seconds += time.perf_counter() - started
        self.rouge_checks += 1
        if match is not None:
            task.update(reason="near_duplicate", rouge=match.score,
                        similar_to=self.pool.tasks[match.entry].instruction)
            return
        made = Task(task["instruction"], task["input"], task["output"])
        example_id = example_of(made).id
        if example_id in self.pool.ids:  # only texts without ROUGE tokens get this far
            task["reason"] = "duplicate"
            return
        started = time.perf_counter()
        self.pool.add(made, tokens, origin, example_id)
        self.rouge_seconds += time.perf_counter() - started
        task.update(status="kept", example_id=example_id)

    def _close_round(self, kept_before: int) -> None:
        self.rounds += 1
        self.stall = 0 if self.pool.generated > kept_before else self.stall + 1

    def replay(self, index: int, part: pa.Table) -> None:
        kept_before = self.pool.generated
        for row in part.select(["request", "tasks"]).to_pylist():
            for task in row["tasks"]:
                self.outcomes[task["reason"] or "kept"] += 1
                if task["status"] == "kept":
                    made = Task(task["instruction"], task["input"], task["output"])
                    self.pool.add(made, tokenize(made.instruction),
                                  (index, row["request"], task["position"]), task["example_id"])
        self._close_round(kept_before)

    # ---- output -----------------------------------------------------------------------------
    def clear(self, store: Store, run_id: str) -> None:
        super().clear(store, run_id)
        if as_ingest.ingest_maker(store, run_id) == GENERATOR:
            for stage in (layout.INGEST, layout.QUARANTINE, layout.DUPLICATES):
                store.clear_stage(run_id, stage)

    def complete(self, store: Store, run_id: str, summary: dict[str, Any]) -> dict[str, Any]:
        made = as_ingest.Made(GENERATOR)
        model = self.settings.endpoint.model
        for number, (task, origin) in enumerate(zip(self.pool.tasks[self.pool.seeds:],
                                                    self.pool.origins, strict=True)):
            round_index, request, position = origin
            example = example_of(task)
            example.source = f"self-instruct:{model}:round-{round_index:05d}"
            example.source_row = number
            example.metadata = {"generator": GENERATOR, "model": model, "round": round_index,
                                "request": request, "position": position,
                                "prompt_version": self.prompt.version}
            made.examples.append(example.to_row())
        source = store.uri(store.stage_path(run_id, layout.GENERATE))
        ingest = as_ingest.write_ingest(store, run_id, made, source=source,
                                        settings={"generate": summary["settings"]},
                                        extra={"seeds_source": self.seeds_source})
        return {"ingest": {k: ingest[k] for k in ("kept", "output", "parts")}}

    def summarize(self, table: pa.Table) -> dict[str, Any]:
        order = {reason: number for number, reason in enumerate(REASONS)}
        filtered = {reason: n for reason, n in sorted(
            self.outcomes.items(), key=lambda item: order.get(item[0], len(order)))
            if reason != "kept" and n}
        unparsed = self.outcomes["malformed"] + self.outcomes["length_cut"]
        candidates = sum(self.outcomes.values())
        return {
            "generator": GENERATOR, "model": self.settings.endpoint.model,
            "route": self.settings.route, "prompt_version": self.prompt.version,
            "prompts": table.num_rows,
            "prompts_failed": table.column("status").to_pylist().count("failed"),
            "candidates": candidates, "parsed": candidates - unparsed,
            "kept": self.outcomes["kept"], "filtered": filtered, "count": self.count,
            "reached": self.pool.generated >= self.count, "stop_reason": self.stop_reason(),
            "pool": len(self.pool.tasks), "seeds": self.pool.seeds,
            "rouge_seconds": round(self.rouge_seconds, 3), "rouge_checks": self.rouge_checks,
            "rouge_exact_scores": self.pool.index.exact_scores,
        }

    def markdown(self, summary: Mapping[str, Any]) -> str:
        cost = (f"est. ${summary['est_cost_usd']:.4f}" if summary.get("price_known")
                else "price unknown")
        lines = [
            f"# Self-instruct of run `{summary['run_id']}`", "",
            f"model `{summary['model']}` ({summary['route']}), {summary['rounds']} rounds, "
            f"{summary['prompts']} prompts ({summary['prompts_failed']} failed), stopped: "
            f"{summary.get('stop_reason') or summary.get('status')}", "",
            "| candidates | parsed | kept | target |", "|---:|---:|---:|---:|",
            f"| {summary['candidates']:,} | {summary['parsed']:,} | {summary['kept']:,} | "
            f"{summary['count']:,} |", "",
            "| filtered because | tasks |", "|---|---:|",
            *(f"| {reason} | {n:,} |" for reason, n in summary["filtered"].items()), "",
            f"{summary['requests']:,} requests, {summary['prompt_tokens']:,} prompt + "
            f"{summary['completion_tokens']:,} completion tokens, {cost}",
        ]
        if summary.get("status") == "stopped":
            lines += ["", f"**Stopped**: {summary.get('stopped_because')}"]
        return "\n".join(lines)


def kept_instructions(store: Store, run_id: str) -> list[str]:
    """The run's kept instructions in the order they joined the pool (from the parts)."""
    table = store.read_stage(run_id, layout.GENERATE, columns=["round", "request", "tasks"],
                             schema=REQUEST_SCHEMA)
    rows = sorted(table.to_pylist(), key=lambda r: (r["round"], r["request"]))
    return [t["instruction"] for r in rows for t in r["tasks"] if t["status"] == "kept"]


def describe(summary: Mapping[str, Any]) -> str:
    """The human summary of ``gleaner generate self-instruct``."""
    filtered = ", ".join(f"{k} {v:,}" for k, v in summary["filtered"].items()) or "none"
    cost = f"${summary['est_cost_usd']:.4f}" if summary.get("price_known") else "price unknown"
    reached = ("reached" if summary["reached"]
               else f"not reached ({summary.get('stop_reason') or summary.get('status')})")
    return (f"run {summary['run_id']}: kept {summary['kept']:,} of {summary['candidates']:,} "
            f"candidates ({summary['parsed']:,} parsed) in {summary['rounds']} rounds, "
            f"target {summary['count']:,} {reached}\nfiltered: {filtered}\n"
            f"{summary['prompts']:,} prompts ({summary['prompts_failed']} failed), "
            f"{summary['requests']:,} requests, {summary['prompt_tokens']:,} prompt + "
            f"{summary['completion_tokens']:,} completion tokens, est. cost {cost}\n"
            f"ROUGE-L filter: {summary['rouge_seconds']:.2f}s for {summary['rouge_checks']:,} "
            f"checks\nexamples: {summary.get('ingest', {}).get('output', '-')}")


def run_self_instruct(config: GleanerConfig, run_id: str, seeds: str, count: int
                      ) -> dict[str, Any]:
    """Grow ``run_id``'s pool from ``seeds`` until ``count`` tasks are kept (or it stops)."""
    section = config.generate
    if count < 1:
        raise ValueError(f"--count must be at least 1, not {count}")
    if getattr(section.endpoint, "api", "chat") != "chat":
        raise ValueError("generate runs in rounds that each wait for the last: it needs a "
                         "synchronous endpoint (generate.endpoint.api: chat), not a Batch API")
    store = Store(config.store.url, config.store.options)
    as_ingest.check_ingest_free(store, run_id, GENERATOR)
    tasks = load_seed_tasks(seeds, source_options([seeds], config),
                            minimum=section.num_prompt_instructions)
    stage = SelfInstructStage(section, tasks, load_prompt(section.prompt_file), count, seeds)
    return run_rounds(stage, config, run_id)


register("offline_role", "generator")(OfflineRole(
    "generate.endpoint", maker_settings("generate"),
    "no generate endpoint configured: the offline SmolLM2 server answers (a 135M model: "
    "expect most of its output to be filtered); set generate.endpoint.base_url for a real "
    "model"))
