"""Which response trains: the regenerated set as another run, and the two answer sets as files.

Rate, select and fine-tune key everything by example id, and the id is a hash of the content:
an example with the teacher's response is another example. So ``--keep`` writes the chosen
responses as the ingest of a new run (``--into``), which is then curated like any other:

- ``teacher``: each example with the teacher's answer (id recomputed; the original response,
  its id and the teacher model in ``metadata.regenerate``); an example whose teacher answer
  failed is quarantined with the error (rerun ``regenerate --retry-failed`` to fill it);
- ``original``: the examples as they were (same ids), the matched baseline of the same rows;
- ``both``: each original and, where the teacher answered, its teacher twin: two examples.

The answer files (``--answers-out``) hold, for every example the teacher answered, the prompt
as the judge should see it and each response, keyed by the example id, in the format
``gleaner evaluate --answers-a/--answers-b`` reads.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import fsspec

from gleaner import layout
from gleaner.schema import Turn, example_id
from gleaner.store import Store
from gleaner.tasks.generate import as_ingest
from gleaner.tasks.generate.regenerate import REGENERATE_SCHEMA
from gleaner.tasks.rate.prompt import instruction_in_context

MAKER = "regenerate"


def _answers(store: Store, run_id: str) -> dict[str, dict[str, Any]]:
    if not store.has_stage(run_id, layout.REGENERATE):
        raise FileNotFoundError(f"run {run_id!r} has no teacher answers; run gleaner "
                                "regenerate first")
    table = store.read_stage(run_id, layout.REGENERATE, schema=REGENERATE_SCHEMA)
    return {r["id"]: r for r in table.to_pylist()}


def _examples(store: Store, run_id: str) -> list[dict[str, Any]]:
    from gleaner.tasks.select.stage import read_examples

    return read_examples(store, run_id).to_pylist()


def with_teacher(example: dict[str, Any], answer: dict[str, Any], run_id: str
                 ) -> dict[str, Any]:
    """The example with the teacher's response: new conversation end, new id, old in metadata."""
    turns = list(example["conversation"])
    teacher = answer["output_teacher"]
    turns[-1] = {"role": "assistant", "content": teacher}
    history = [Turn(t["role"], t["content"]) for t in turns[:-2]]
    metadata = json.loads(example["metadata"] or "{}")
    metadata["regenerate"] = {"response": "teacher", "teacher_model": answer["teacher_model"],
                              "from_run": run_id, "original_id": example["id"],
                              "output_original": example["output"],
                              "finish_reason": answer["finish_reason"]}
    return {**example, "output": teacher, "conversation": turns,
            "id": example_id(example["instruction"], example["input"], teacher, history),
            "metadata": json.dumps(metadata, ensure_ascii=False, sort_keys=True)}


def _as_original(example: dict[str, Any], run_id: str) -> dict[str, Any]:
    metadata = json.loads(example["metadata"] or "{}")
    metadata["regenerate"] = {"response": "original", "from_run": run_id}
    return {**example, "metadata": json.dumps(metadata, ensure_ascii=False, sort_keys=True)}


def write_training_run(store: Store, run_id: str, into: str, keep: str,
                       batch_rows: int = 50_000) -> dict[str, Any]:
    """Write ``into``'s ingest from ``run_id``'s examples and teacher answers; its summary."""
    if into == run_id:
        raise ValueError("--into must name another run: the teacher's examples have other ids")
    previous = store.run_path(into, layout.INGEST, layout.SUMMARY_FILE)
    if store.exists(previous) and store.read_json(previous).get("from_run") not in (None, run_id):
        raise as_ingest.IngestOwned(f"run {into!r} holds the regenerated examples of run "
                                    f"{store.read_json(previous)['from_run']!r}; use another "
                                    "--into")
    answers, made = _answers(store, run_id), as_ingest.Made(MAKER)
    teacher_model = None
    for example in _examples(store, run_id):
        answer = answers.get(example["id"])
        if keep in ("original", "both"):
            made.examples.append(_as_original(example, run_id))
        if keep == "original":
            continue
        turns = example["conversation"] or []
        if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user":
            made.quarantine(example["source"], example["source_row"], "conversation",
                            "unexpected_conversation", f"example {example['id']} does not end "
                            "with a user turn and its answer")
            continue
        if answer is None or answer["status"] != "ok":
            why = "no teacher answer" if answer is None else (
                f"{answer['error_kind']}: {answer['error']}")
            made.quarantine(example["source"], example["source_row"], "output",
                            "teacher_failed", f"the teacher did not answer example "
                            f"{example['id']}: {why}"[:2000])
            continue
        teacher_model = answer["teacher_model"]
        made.examples.append(with_teacher(example, answer, run_id))
    source = store.uri(store.stage_path(run_id, layout.REGENERATE))
    return as_ingest.write_ingest(
        store, into, made, source=source, batch_rows=batch_rows,
        settings={"keep": keep, "from_run": run_id},
        extra={"from_run": run_id, "keep": keep, "teacher_model": teacher_model})


def judge_prompt(example: dict[str, Any]) -> str:
    """The question as the judge sees it: earlier turns (if any), the instruction, its input."""
    question = instruction_in_context(example["instruction"], example["conversation"])
    return f"{question}\n\n{example['input']}" if example["input"] else question


def export_answer_files(store: Store, run_id: str, directory: str,
                        storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``teacher.jsonl`` and ``original.jsonl`` in ``directory``: the same examples, by id."""
    answers = _answers(store, run_id)
    rows = {"teacher": [], "original": []}
    for example in _examples(store, run_id):
        answer = answers.get(example["id"])
        if answer is None or answer["status"] != "ok":
            continue
        prompt = judge_prompt(example)
        for side, text in (("teacher", answer["output_teacher"]),
                           ("original", example["output"])):
            rows[side].append({"id": example["id"], "prompt": prompt, "answer": text,
                               "test_set": f"regenerate-{run_id}"})
    paths = {}
    for side, lines in rows.items():
        path = posixpath.join(directory.rstrip("/"), f"{side}.jsonl")
        with fsspec.open(path, "wt", encoding="utf-8", auto_mkdir=True,
                         **(storage_options or {})) as handle:
            for line in lines:
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        paths[side] = path
    return {"rows": len(rows["teacher"]), **paths}
