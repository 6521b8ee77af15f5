"""Answer files from any system, and how two of them are lined up for judging.

An answer file is JSONL with ``prompt`` and ``answer`` (``id`` and ``test_set``
optional; alpaca_eval's ``instruction``/``output``/``dataset`` are read too).
Two files are joined by ``id`` when every row of both has one, else by prompt.
The same prompt can appear more than once (test sets overlap), so the key is
(prompt, occurrence number) -- the second "Hi" of file A meets the second "Hi"
of file B. Rows found in only one file are returned, so the report can count
and name them instead of dropping them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from gleaner.jsonl import json_lines
from gleaner.tasks.evaluate.judge import Pair


class AnswerFileError(ValueError):
    pass


@dataclass(frozen=True)
class AnswerRow:
    line: int
    prompt: str
    answer: str
    id: str | None = None
    test_set: str | None = None


def _field(row: dict[str, Any], names: tuple[str, ...], where: str, required: bool) -> str | None:
    for name in names:
        if name in row and row[name] is not None:
            value = row[name]
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise AnswerFileError(
                    f"{where}: field {name!r} must be a string, got {value!r:.80}")
            return str(value)
    if required:
        raise AnswerFileError(f"{where}: missing field {names[0]!r}")
    return None


def load_answers(url: str, storage_options: dict[str, Any] | None = None) -> list[AnswerRow]:
    rows: list[AnswerRow] = []
    for number, where, row in json_lines(url, AnswerFileError, "answer file", storage_options):
        rows.append(AnswerRow(
            line=number,
            prompt=_field(row, ("prompt", "instruction", "question"), where, True) or "",
            answer=_field(row, ("answer", "output", "response"), where, True) or "",
            id=_field(row, ("id", "question_id"), where, False),
            test_set=_field(row, ("test_set", "dataset"), where, False),
        ))
    return rows


@dataclass
class Joined:
    pairs: list[Pair]
    join_key: str  # "id" or "prompt"
    only_a: list[AnswerRow] = field(default_factory=list)
    only_b: list[AnswerRow] = field(default_factory=list)
    prompt_mismatch: int = 0  # joined by id, but the prompt texts differ

    def unmatched_report(self) -> list[dict[str, Any]]:
        return [
            {"file": side, "line": r.line, "id": r.id, "prompt": r.prompt[:200]}
            for side, rows in (("a", self.only_a), ("b", self.only_b)) for r in rows
        ]


def _keys(rows: list[AnswerRow], by_id: bool) -> list[tuple[str, int]]:
    seen: Counter[str] = Counter()
    keys = []
    for row in rows:
        base = row.id if by_id else row.prompt.strip()
        keys.append((base, seen[base]))
        seen[base] += 1
    return keys


def join_answers(rows_a: list[AnswerRow], rows_b: list[AnswerRow],
                 default_test_set: str = "answers") -> Joined:
    """Line up A's and B's answers; A is the model under test."""
    by_id = bool(rows_a) and bool(rows_b) and all(r.id is not None for r in rows_a + rows_b)
    keys_b = dict(zip(_keys(rows_b, by_id), rows_b, strict=True))
    matched: set[tuple[str, int]] = set()
    pairs: list[Pair] = []
    only_a: list[AnswerRow] = []
    mismatch = 0
    for key, row_a in zip(_keys(rows_a, by_id), rows_a, strict=True):
        row_b = keys_b.get(key)
        if row_b is None:
            only_a.append(row_a)
            continue
        matched.add(key)
        if by_id and row_a.prompt.strip() != row_b.prompt.strip():
            mismatch += 1
        label = f"{key[0]}#{key[1]}" if key[1] else key[0]
        pairs.append(Pair(
            test_set=row_a.test_set or row_b.test_set or default_test_set,
            key=label if by_id else f"line {row_a.line}",
            question=row_a.prompt, answer_a=row_a.answer, answer_b=row_b.answer,
        ))
    only_b = [row for key, row in keys_b.items() if key not in matched]
    return Joined(pairs, "id" if by_id else "prompt", only_a, only_b, mismatch)
