"""Loopback answers to Alpaca's self-instruct request, for tests and the benchmark.

- :func:`scripted_answers`: three answers (and one HTTP 400) with every filter's case in them;
- :class:`GrowingResponder`: an answer that depends only on the request's text (so a resumed
  run gets the answers an uninterrupted one got), made of real Alpaca instructions.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
import threading
from collections.abc import Sequence

from tests.support.openai_server import Reply, request_text


def task(k: int, instruction: str, given: str = "<noinput>", output: str = "An answer.") -> str:
    return f"{k}. Instruction: {instruction}\n{k}. Input:\n{given}\n{k}. Output:\n{output}\n"


def numbered(pieces: Sequence[str], first: int = 4) -> str:
    """The model's continuation: the pieces after the request's ``{first}. Instruction:``."""
    return "###\n".join(pieces).removeprefix(f"{first}. Instruction:")


TOO_LONG = "Summarize " + " ".join(["the history of the town"] * 30)
# what each scripted answer holds, by the reason the parse or a filter gives it
SCRIPTED = [
    Reply(numbered([
        task(4, "Explain why the sky appears blue during the day.", output="Rayleigh scattering."),
        task(5, "Draw a picture of a cat sitting on a mat."),  # blacklisted
        task(6, "Sort these numbers."),  # too_short
        task(7, "What is the relation between the given two pairs?",  # near a seed
             "Night : Day :: Right : Left", "Opposites."),
        task(8, "Write a program that prints the first ten prime numbers."),  # write_a_program
        task(10, "This task skipped the number nine in the list."),  # malformed (numbering)
        task(10, "Suggest a name for a bakery that sells only vegan pastries.",
             output="Green Crumb."),
        "\n"])),
    Reply(numbered([
        task(4, "List four ways a small town can reduce its plastic waste.",
             output="Bans, deposits, refills, composting."),
        task(5, "日本 is a country; name its three largest cities."),  # starts_non_ascii
        task(6, "'Rewrite' the following sentence in a formal tone.",  # starts_with_punctuation
             "gonna be late", "I will be late."),
        task(7, "Explain why the sky appears blue during the daytime."),  # near the first's 4
        "8. Instruction: Compose a haiku about autumn leaves\n8. Input:\n<noinp",  # length_cut
    ]), finish_reason="length"),
    Reply(numbered([
        "4. Instruction: Give three tips\n4. Output:\nEat, sleep, move.\n",  # malformed
        task(5, "Name three famous painters from the Renaissance period.", output=""),  # empty
        task(6, TOO_LONG),  # too_long
        task(7, "Describe how a bill becomes a law in the United States.",
             output="Congress passes it and the president signs it."),
        task(8, "Describe how a bill becomes law in the United States Congress."),  # near 7
        "\n"])),
    Reply(status=400, error_message="injected: this prompt is not allowed"),
]
EXPECTED = {"kept": 4, "filtered": {
    "blacklisted": 1, "too_short": 1, "near_duplicate": 3, "write_a_program": 1, "malformed": 2,
    "starts_non_ascii": 1, "starts_with_punctuation": 1, "length_cut": 1, "empty_output": 1,
    "too_long": 1}}


def is_probe(body: dict) -> bool:
    return request_text(body) == "Say OK."


class ScriptedResponder:
    """The scripted replies in arrival order (their counts do not depend on which request
    gets which: the near duplicates across answers keep exactly one of each pair)."""

    def __init__(self, replies: Sequence[Reply] = SCRIPTED):
        self.replies = itertools.cycle(replies)
        self.lock = threading.Lock()

    def __call__(self, body: dict) -> Reply:
        if is_probe(body):
            return Reply("OK")
        with self.lock:
            return next(self.replies)


def shown_instructions(prompt: str) -> list[str]:
    return re.findall(r"^\d+\. Instruction: (.*)$", prompt, flags=re.MULTILINE)


class GrowingResponder:
    """16 tasks per answer, drawn from ``instructions`` by a hash of the request's text."""

    def __init__(self, instructions: Sequence[str], per_answer: int = 16, delay_s: float = 0.0):
        self.instructions = list(instructions)
        self.per_answer = per_answer
        self.delay_s = delay_s

    def __call__(self, body: dict) -> Reply:
        if is_probe(body):
            return Reply("OK")
        prompt = request_text(body)
        rng = random.Random(hashlib.sha256(prompt.encode()).digest())
        first = len(shown_instructions(prompt)) + 1
        pieces = [task(first + i, rng.choice(self.instructions), output=f"Answer {i}.")
                  for i in range(self.per_answer)]
        return Reply(numbered(pieces + ["\n"], first), delay_s=self.delay_s)
