"""Where the K responses to a prompt come from: a registry of response sources.

A source spec is ``name`` or ``name:argument`` for a registered source, anything else is an
answer file (JSONL with prompt and answer, optional id; see gleaner.tasks.evaluate.answers):

- ``original``: the example's own response, as ingested;
- ``teacher``: the teacher's answer from ``gleaner regenerate`` (its ok rows);
- ``evaluate:<model>``: the answers ``gleaner evaluate`` stored for a model of the run;
- a path or URL: an answer file, each row joined to the run's examples by ``id`` when it
  names one of them, else taken as its own prompt (matched to others by prompt text).

A prompt is identified by its turns before the answer (normalised text): the same
instruction from the pool, the teacher and an answer file is one prompt with K responses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.registry import register, registry
from gleaner.schema import EXAMPLE_SCHEMA, TURN_TYPE, normalise_text
from gleaner.store import Store


@dataclass(frozen=True)
class Response:
    """One response to one prompt, and the source it came from."""

    turns: tuple[tuple[str, str], ...]  # (role, content) before the answer
    instruction: str
    input: str
    response: str
    source: str


@dataclass
class SourceResult:
    responses: list[Response]
    unavailable: int = 0  # rows the source has but could not give (a failed teacher row ...)
    note: str = ""


@dataclass
class SourceContext:
    """What a source may read: the run's store and examples (loaded once, by id)."""

    store: Store
    run_id: str
    config: GleanerConfig
    _examples: dict[str, dict[str, Any]] | None = field(default=None, repr=False)

    def examples(self) -> dict[str, dict[str, Any]]:
        if self._examples is None:
            if self.store.has_stage(self.run_id, layout.INGEST):
                rows = self.store.read_stage(self.run_id, layout.INGEST,
                                             schema=EXAMPLE_SCHEMA).to_pylist()
            else:
                rows = []
            self._examples = {r["id"]: r for r in rows}
        return self._examples


Source = Callable[[SourceContext, str | None], SourceResult]


def prompt_turns(example: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """An example's turns before its final answer."""
    turns = list(example.get("conversation") or [])
    if turns and turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    if not turns:
        given = example.get("input") or ""
        text = f"{example['instruction']}\n\n{given}" if given else example["instruction"]
        turns = [{"role": "user", "content": text}]
    return tuple((t["role"], t["content"]) for t in turns)


def prompt_id(turns: Sequence[tuple[str, str]]) -> str:
    """The prompt's identity: a hash of its normalised turns (not of any response)."""
    blob = json.dumps([[r, normalise_text(c)] for r, c in turns], ensure_ascii=False,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def response_id(pid: str, response: str) -> str:
    """A response row's id: (prompt, response) content, so the judge is cached per both."""
    blob = json.dumps([pid, normalise_text(response)], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _from_example(example: Mapping[str, Any], response: str, source: str) -> Response:
    return Response(prompt_turns(example), example["instruction"], example.get("input") or "",
                    response, source)


@register("response_source", "original")
def original(ctx: SourceContext, arg: str | None) -> SourceResult:
    """The example's own response."""
    return SourceResult([_from_example(e, e["output"], "original")
                         for e in ctx.examples().values()])


@register("response_source", "teacher")
def teacher(ctx: SourceContext, arg: str | None) -> SourceResult:
    """The teacher's answers of ``gleaner regenerate`` (failed teacher rows are unavailable)."""
    if not ctx.store.has_stage(ctx.run_id, layout.REGENERATE):
        raise FileNotFoundError(f"response source 'teacher': run {ctx.run_id!r} has no "
                                "regenerate output; run gleaner regenerate first")
    rows = ctx.store.read_stage(ctx.run_id, layout.REGENERATE,
                                columns=["id", "status", "output_teacher"]).to_pylist()
    examples = ctx.examples()
    out = [_from_example(examples[r["id"]], r["output_teacher"], "teacher") for r in rows
           if r["status"] == "ok" and r["output_teacher"] and r["id"] in examples]
    return SourceResult(out, unavailable=len(rows) - len(out))


@register("response_source", "evaluate")
def evaluate_answers(ctx: SourceContext, arg: str | None) -> SourceResult:
    """The answers ``gleaner evaluate`` stored for model ``arg`` (every test set)."""
    if not arg:
        raise ValueError("response source 'evaluate' needs a model: evaluate:<model>")
    folder = layout.answers_dir(ctx.store, ctx.run_id, arg)
    paths = sorted(p for p in ctx.store.fs.find(folder) if p.endswith(".parquet")) \
        if ctx.store.exists(folder) else []
    if not paths:
        raise FileNotFoundError(f"response source 'evaluate:{arg}': no answers in "
                                f"{ctx.store.uri(folder)}; run gleaner evaluate first")
    rows = ctx.store.dataset(paths).to_table(columns=["question", "answer"]).to_pylist()
    return SourceResult([Response((("user", r["question"]),), r["question"], "", r["answer"],
                                  f"evaluate:{arg}") for r in rows])


@register("response_source", "file")
def answer_file(ctx: SourceContext, arg: str | None) -> SourceResult:
    """An answer file; a row whose id is one of the run's examples takes that example's turns."""
    from gleaner.tasks.evaluate.answers import load_answers

    if not arg:
        raise ValueError("response source 'file' needs a path: file:<path>")
    options = ctx.config.store.options if arg.startswith("s3://") else None
    examples = ctx.examples()
    out = []
    for row in load_answers(arg, options):
        example = examples.get(row.id) if row.id else None
        out.append(_from_example(example, row.answer, arg) if example else
                   Response((("user", row.prompt),), row.prompt, "", row.answer, arg))
    return SourceResult(out)


def resolve(spec: str) -> tuple[Source, str | None, str]:
    """(source, its argument, the label rows carry) for one ``--responses`` entry."""
    name, _, arg = spec.partition(":")
    if name in registry("response_source") and name != "file":
        return registry("response_source").get(name), arg or None, spec
    if name == "file":
        return answer_file, arg, arg
    return answer_file, spec, spec


RESPONSES_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("turns", pa.list_(TURN_TYPE), nullable=False),
    pa.field("question", pa.string(), nullable=False),  # what the judge is shown
    pa.field("instruction", pa.string(), nullable=False),
    pa.field("input", pa.string(), nullable=False),
    pa.field("response", pa.string(), nullable=False),
    pa.field("sources", pa.list_(pa.string()), nullable=False),
])


@dataclass
class Gathered:
    """The responses to judge, and how every response read was accounted for."""

    table: pa.Table
    counts: dict[str, Any]


def gather(results: Mapping[str, SourceResult], limit: int | None = None) -> Gathered:
    """One row per distinct (prompt, response); prompts with fewer than two are not judged."""
    from gleaner.tasks.compare.grading import prompt_text

    by_prompt: dict[str, dict[str, dict[str, Any]]] = {}
    read, empty, merged = 0, 0, 0
    for label, result in results.items():
        for r in result.responses:
            read += 1
            if not r.response.strip():
                empty += 1
                continue
            pid = prompt_id(r.turns)
            rows = by_prompt.setdefault(pid, {})
            rid = response_id(pid, r.response)
            if rid in rows:
                merged += 1
                if label not in rows[rid]["sources"]:
                    rows[rid]["sources"].append(label)
                continue
            turns = [{"role": role, "content": text} for role, text in r.turns]
            rows[rid] = {"id": rid, "prompt_id": pid, "turns": turns,
                         "question": prompt_text(turns), "instruction": r.instruction,
                         "input": r.input, "response": r.response, "sources": [label]}
    prompts = list(by_prompt.items())
    beyond = len(prompts) - limit if limit is not None and len(prompts) > limit else 0
    prompts = prompts[:limit] if limit is not None else prompts
    judged = [(pid, rows) for pid, rows in prompts if len(rows) >= 2]
    rows = [row for _, group in judged for row in group.values()]
    counts = {
        "responses_read": read, "by_source": {k: len(v.responses) for k, v in results.items()},
        "unavailable": {k: v.unavailable for k, v in results.items() if v.unavailable},
        "empty_skipped": empty, "duplicates_merged": merged,
        "prompts": len(by_prompt), "prompts_beyond_limit": beyond,
        "prompts_single_response": sum(1 for _, g in prompts if len(g) < 2),
        "responses_single_prompt": sum(len(g) for _, g in prompts if len(g) < 2),
        "responses_beyond_limit": sum(len(g) for _, g in list(by_prompt.items())[len(prompts):]),
        "prompts_judged": len(judged), "responses": len(rows),
    }
    return Gathered(pa.Table.from_pylist(rows, schema=RESPONSES_SCHEMA), counts)
