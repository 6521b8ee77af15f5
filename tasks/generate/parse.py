"""Alpaca's parse of a self-instruct answer (``post_process_gpt3_response``), with every drop named.

The answer continues the numbered list, so the parse puts back the ``{k+1}. Instruction:``
the request ended with, splits on ``###`` and reads each piece as
``N. Instruction: … N. Input: … N. Output: …`` with ``N`` the piece's expected number. What
Alpaca dropped silently is a candidate here with a reason:

- ``length_cut``: the last piece of an answer cut by the length limit (``finish_reason`` is
  ``length``): likely truncated, so Alpaca discarded it;
- ``malformed``: a piece that does not split into exactly those three numbered fields (broken
  numbering, a missing field, a field repeated inside an output).

Blank pieces (the whitespace after a final ``###``) are not tasks and are not counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NO_INPUT = "<noinput>"


@dataclass(frozen=True)
class Candidate:
    """One piece of an answer: a task, or why it could not be read as one."""

    position: int  # its number in the list (k+1 for the first piece)
    instruction: str = ""
    input: str = ""
    output: str = ""
    reason: str | None = None  # "length_cut" | "malformed" when it could not be read

    @property
    def parsed(self) -> bool:
        return self.reason is None


def strip_echo(text: str, first: int) -> str:
    """Chat models often repeat the ``{first}. Instruction:`` the request ended with: drop it,
    so that putting it back does not double it."""
    return re.sub(rf"^\s*{first}\.\s+Instruction:", "", text, count=1)


def parse_answer(text: str, num_prompt_instructions: int, finish_reason: str | None
                 ) -> list[Candidate]:
    """Every non-blank piece of ``text`` as a candidate, in order."""
    first = num_prompt_instructions + 1
    pieces = re.split("###", f"{first}. Instruction:" + text)
    out: list[Candidate] = []
    for offset, piece in enumerate(pieces):
        number = offset + first
        if offset == len(pieces) - 1 and finish_reason == "length":
            if piece.strip():
                out.append(Candidate(number, reason="length_cut"))
            continue
        if not piece.strip():
            continue
        fields = re.split(rf"{number}\.\s+(Instruction|Input|Output):", piece)
        if len(fields) != 7:
            out.append(Candidate(number, reason="malformed"))
            continue
        given = fields[4].strip()
        out.append(Candidate(number, fields[2].strip(),
                             "" if given.lower() == NO_INPUT else given, fields[6].strip()))
    return out
