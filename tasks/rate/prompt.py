"""The AlpaGasus rating prompt (SPEC §1, the paper's Fig. 3), and how a conversation is shown.

The paper rated single-turn Alpaca triplets. A multi-turn example (LIMA,
ShareGPT) is rated on its final answer *in context*: the instruction block
carries the dialogue so far, then the final instruction, and the response is
the final answer::

    ###Instruction:
    The conversation so far:
    System: ...            (when there is one)
    User: ...
    Assistant: ...

    The final instruction:
    <instruction>

A single-turn example renders exactly as the paper's prompt (byte-identical to
gleaner's earlier single-turn prompt, so its cached ratings stay valid).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}
CONTEXT_HEADER = "The conversation so far:"
FINAL_HEADER = "The final instruction:"


def earlier_turns(conversation: Sequence[Mapping[str, str]] | None) -> list[Mapping[str, str]]:
    """The turns before the final (user, assistant) exchange, system turn included."""
    turns = list(conversation or [])
    if len(turns) >= 2 and turns[-1]["role"] == "assistant" and turns[-2]["role"] == "user":
        return turns[:-2]
    return []


def instruction_in_context(instruction: str, conversation: Sequence[Mapping[str, str]] | None
                           ) -> str:
    """The instruction block: the instruction alone, or the dialogue so far and then it."""
    before = earlier_turns(conversation)
    if not before:
        return instruction
    lines = [CONTEXT_HEADER]
    lines += [f"{ROLE_LABELS.get(t['role'], t['role'])}: {t['content']}" for t in before]
    return "\n".join(lines) + f"\n\n{FINAL_HEADER}\n{instruction}"


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
            "instruction": instruction_in_context(str(row.get("instruction") or ""),
                                                  row.get("conversation")),
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
