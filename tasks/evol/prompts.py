"""DEITA's EVOL prompts (Liu et al. 2024, App. E.2 and E.4, Tables 12-14 and 16-18), verbatim.

Rewriting: complexity evolves the *instruction* with WizardLM's in-depth methods (adding
constraints, deepening, concretizing, increasing reasoning steps), quality evolves the
*response* (helpfulness, relevance, depth, creativity, details); both ask for 10 to 20 added
words. The paper's tables end the deepening and concretizing methods with a stray " or"
(WizardLM lists its methods joined by "or"); it is left out here.

Ranking: one call shows all M+1 versions, so the ranker sees the small differences between
them; scores run 1..M+1 (1-5 for M = 4), and M+2 (6) is reserved for "too complex to
answer" (complexity) or "cannot be improved further" (quality). The tables show the format
hint as ``\\n [1] Score: 1\\n [2] Score: 2\\n``: real newlines here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

Kind = Literal["complexity", "quality"]
KINDS: tuple[Kind, ...] = ("complexity", "quality")

COMPLEXITY_REWRITE = (
    "I want you act as a Prompt Rewriter.\n"
    "Your objective is to rewrite a given prompt into a more complex version to make those "
    "famous AI systems (e.g., ChatGPT and GPT4) a bit harder to handle.\n"
    "But the rewritten prompt must be reasonable and must be understood and responded by "
    "humans.\n"
    "Your rewriting cannot omit the non-text parts such as the table and code in #Given "
    "Prompt#:. Also, please do not omit the input in #Given Prompt#.\n"
    "You SHOULD complicate the given prompt using the following method:\n"
    "{method}\n"
    "You should try your best not to make the #Rewritten Prompt# become verbose, #Rewritten "
    "Prompt# can only add 10 to 20 words into #Given Prompt#.\n"
    "'#Given Prompt#', '#Rewritten Prompt#', 'given prompt' and 'rewritten prompt' are not "
    "allowed to appear in #Rewritten Prompt#\n"
    "#Given Prompt#:\n{text}\n#Rewritten Prompt#:\n"
)
COMPLEXITY_METHODS = {
    "constraints": "Please add one more constraints/requirements into #Given Prompt#",
    "deepening": "If #Given Prompt# contains inquiries about certain issues, the depth and "
                 "breadth of the inquiry can be increased.",
    "concretizing": "Please replace general concepts with more specific concepts.",
    "reasoning": "If #Given Prompt# can be solved with just a few simple thinking processes, "
                 "you can rewrite it to explicitly request multiple-step reasoning.",
}

QUALITY_REWRITE = (
    "I want you to act as a Response Rewriter\n"
    "Your goal is to enhance the quality of the response given by an AI assistant to the "
    "#Given Prompt# through rewriting.\n"
    "But the rewritten response must be reasonable and must be understood by humans.\n"
    "Your rewriting cannot omit the non-text parts such as the table and code in #Given "
    "Prompt# and #Given Response#. Also, please do not omit the input in #Given Prompt#.\n"
    "You Should enhance the quality of the response using the following method:\n"
    "{method}\n"
    "You should try your best not to make the #Rewritten Response# become verbose, "
    "#Rewritten Response# can only add 10 to 20 words into #Given Response#.\n"
    "'#Given Response#', '#Rewritten Response#', 'given response' and 'rewritten response' "
    "are not allowed to appear in #Rewritten Response#\n"
    "#Given Prompt#:\n{instruction}\n#Given Response#:\n{text}\n#Rewritten Response#:\n"
)
QUALITY_METHODS = {
    "helpfulness": "Please make the Response more helpful to the user.",
    "relevance": "Please make the Response more relevant to #Given Prompt#.",
    "depth": "Please make the Response more in-depth",
    "creativity": "Please increase the creativity of the response",
    "details": "Please increase the detail level of Response",
}

COMPLEXITY_RANK = (
    "Ranking the following questions according to the difficulty and complexity. Score 1-{n}. "
    "You can give a score of {top} if the question is too complex for you to answer it. You "
    "should respond with the format:\n [1] Score: 1\n [2] Score: 2\n"
)
QUALITY_RANK = (
    "Rank the following responses provided by different AI assistants to the user's question "
    "according to the quality of their response. Score each response from 1 to {n}, with {top} "
    "reserved for responses that are already very well written and cannot be improved further. "
    "Your evaluation should consider factors such as helpfulness, relevance, accuracy, depth, "
    "creativity, and level of detail of the response.\n"
    "Use the following format:\n[Response 1] Score:\n[Response 2] Score:\n"
)

PROMPT_VERSION = hashlib.sha256("\x00".join([
    COMPLEXITY_REWRITE, *COMPLEXITY_METHODS.values(), QUALITY_REWRITE, *QUALITY_METHODS.values(),
    COMPLEXITY_RANK, QUALITY_RANK]).encode()).hexdigest()[:12]


def methods(kind: Kind) -> dict[str, str]:
    return COMPLEXITY_METHODS if kind == "complexity" else QUALITY_METHODS


def round_methods(kind: Kind, seed_id: str, rounds: int) -> list[str]:
    """The method of each round: the kind's methods in order, starting at a place fixed by
    the seed's id, so every method is used about equally often over a pool (quality has five
    methods for four rounds) and a rerun evolves a seed the same way."""
    names = list(methods(kind))
    offset = int(hashlib.sha256(seed_id.encode()).hexdigest(), 16) % len(names)
    return [names[(offset + k) % len(names)] for k in range(rounds)]


def rewrite_prompt(kind: Kind, method: str, text: str, instruction: str = "") -> str:
    if kind == "complexity":
        return COMPLEXITY_REWRITE.format(method=COMPLEXITY_METHODS[method], text=text)
    return QUALITY_REWRITE.format(method=QUALITY_METHODS[method], instruction=instruction,
                                  text=text)


def rank_prompt(kind: Kind, versions: Sequence[str], instruction: str = "") -> str:
    """One request ranking and scoring all versions (1..n, n+1 reserved)."""
    n = len(versions)
    if kind == "complexity":
        listed = "\n".join(f"[{k}] {v}" for k, v in enumerate(versions, start=1))
        return COMPLEXITY_RANK.format(n=n, top=n + 1) + listed
    listed = "\n".join(f"[Response {k}] {v}" for k, v in enumerate(versions, start=1))
    return (QUALITY_RANK.format(n=n, top=n + 1) + f"#Question#: {instruction}\n"
            f"#Response List#:\n{listed}")


def rank_grammar(kind: Kind, n: int) -> str:
    """llama.cpp GBNF: exactly the n score lines (what a small local model cannot keep to)."""
    label = "[{k}] Score: " if kind == "complexity" else "[Response {k}] Score: "
    lines = " ".join(f'"{label.format(k=k)}" score "\\n"' for k in range(1, n + 1))
    return f"root ::= {lines}\nscore ::= [1-{n + 1}]\n"


_LABELS = ("#Rewritten Prompt#:", "#Rewritten Response#:", "#Rewritten Prompt#",
           "#Rewritten Response#")


def clean_rewrite(text: str) -> str:
    """The rewrite without an echoed label (a rewriter may start with "#Rewritten Prompt#:")."""
    text = text.strip()
    for label in _LABELS:
        if label in text:
            text = text.rsplit(label, 1)[1].strip()
    return text
