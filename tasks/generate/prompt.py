"""Alpaca's self-instruct request: the prompt text, then 3 numbered tasks, then ``4. Instruction:``.

The prompt text is stanford_alpaca's ``prompt.txt`` (github.com/tatsu-lab/stanford_alpaca,
Apache-2.0), kept verbatim (its typos and its repeated numbering included) in
``alpaca_prompt.txt`` beside this module; ``generate.prompt_file`` replaces it. The encoding is
Alpaca's ``encode_prompt``: whitespace runs collapsed and a trailing ':' dropped from each
instruction, ``<noinput>`` for an empty input, ``###`` between tasks, and the request ends with
the next number's ``Instruction:`` so the model continues the list.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gleaner.tasks.generate.seeds import Task

ALPACA_PROMPT_FILE = Path(__file__).with_name("alpaca_prompt.txt")
NO_INPUT = "<noinput>"


@dataclass(frozen=True)
class GenerationPrompt:
    text: str  # the file's text, as read

    @property
    def version(self) -> str:
        """Hash of the prompt text: rounds made with another prompt never resume this run."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:12]

    def encode(self, tasks: Sequence[Task]) -> str:
        """The request for ``tasks`` shown as examples 1..k, asking for k+1 onwards."""
        prompt = self.text + "\n"
        for number, task in enumerate(tasks, start=1):
            instruction = re.sub(r"\s+", " ", task.instruction).strip().rstrip(":")
            given = NO_INPUT if task.input.lower() == "" else task.input
            prompt += "###\n"
            prompt += f"{number}. Instruction: {instruction}\n"
            prompt += f"{number}. Input:\n{given}\n"
            prompt += f"{number}. Output:\n{task.output}\n"
        prompt += "###\n"
        prompt += f"{len(tasks) + 1}. Instruction:"
        return prompt


def load_prompt(path: str | Path | None = None) -> GenerationPrompt:
    """Alpaca's prompt.txt, or the text of ``path``."""
    source = Path(path) if path is not None else ALPACA_PROMPT_FILE
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"cannot read the generation prompt {source}: {error.strerror}") from None
    if not text.strip():
        raise ValueError(f"the generation prompt {source} is empty")
    return GenerationPrompt(text)
