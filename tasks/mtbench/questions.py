"""MT-Bench's 80 two-turn questions and GPT-4's reference answers, as FastChat ships them.

``question.jsonl`` rows: ``question_id``, ``category``, ``turns`` (two user
turns). ``reference_answer/gpt-4.jsonl`` rows: ``question_id``,
``choices[0].turns`` (two reference answers), for the categories graded
against a reference (math, reasoning, coding). Which questions are asked:
all, the ones named (``mt_bench.question_ids``), or the first N of every
category (``per_category``). A reference-graded question without a
reference answer stops the load, naming the file and the question.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from gleaner.config import GleanerConfig
from gleaner.jsonl import json_lines
from gleaner.tasks.evaluate.eval_sets import EvalSetError, eval_sets_folder, shipped_file
from gleaner.tasks.mtbench.prompts import NEED_REF_CATS

QUESTIONS_FILE = "mt_bench_question.jsonl"
REFERENCES_FILE = posixpath.join("mt_bench", "reference_answer_gpt-4.jsonl")


@dataclass(frozen=True)
class MTQuestion:
    question_id: int
    category: str
    turns: tuple[str, str]
    references: tuple[str, str] | None = None  # GPT-4's answers (reference-graded categories)


def files(config: GleanerConfig) -> tuple[str, str]:
    """(questions, references) URLs: configured, else in the eval-sets folder, else FastChat's
    files shipped with gleaner (Apache-2.0, tasks/evaluate/data/NOTICE)."""
    settings = config.mt_bench
    folder = eval_sets_folder(config.evaluate.test_sets_dir)

    def where(file_name: str) -> str:
        if folder:
            return posixpath.join(folder.rstrip("/"), file_name)
        return shipped_file(file_name) or file_name

    return (settings.questions_file or where(QUESTIONS_FILE),
            settings.references_file or where(REFERENCES_FILE))


def _two(value: Any, where: str, field: str) -> tuple[str, str]:
    if not (isinstance(value, list) and len(value) >= 2 and all(isinstance(t, str)
                                                                for t in value[:2])):
        raise EvalSetError(f"{where}: field {field!r} must hold two strings")
    return value[0], value[1]


def load_questions(config: GleanerConfig) -> list[MTQuestion]:
    """The questions to ask, in file order, each with its references where it needs them."""
    questions_url, references_url = files(config)
    settings = config.mt_bench
    references: dict[int, tuple[str, str]] = {}
    for _, where, row in json_lines(references_url, EvalSetError, "MT-Bench references"):
        choices = row.get("choices") or [{}]
        references[int(row["question_id"])] = _two(choices[0].get("turns"), where,
                                                   "choices[0].turns")
    wanted = set(settings.question_ids) if settings.question_ids is not None else None
    taken: dict[str, int] = {}
    out: list[MTQuestion] = []
    for number, where, row in json_lines(questions_url, EvalSetError, "MT-Bench questions"):
        qid, category = int(row.get("question_id", number)), str(row.get("category", ""))
        if wanted is not None and qid not in wanted:
            continue
        if settings.per_category is not None and taken.get(category, 0) >= settings.per_category:
            continue
        taken[category] = taken.get(category, 0) + 1
        reference = None
        if category in NEED_REF_CATS:
            reference = references.get(qid)
            if reference is None:
                raise EvalSetError(f"{where}: question {qid} ({category}) is graded against a "
                                   f"reference answer, and {references_url} has none for it")
        out.append(MTQuestion(qid, category, _two(row.get("turns"), where, "turns"), reference))
    if wanted is not None and len(out) != len(wanted):
        missing = sorted(wanted - {q.question_id for q in out})
        raise EvalSetError(f"MT-Bench: question ids {missing} are not in {questions_url}")
    return out
