"""FastChat's single-answer grading prompts for MT-Bench, verbatim, and which one grades what.

Source: lm-sys/FastChat, ``fastchat/llm_judge/data/judge_prompts.jsonl`` (Apache-2.0),
the four ``type: single`` prompts (a copy of the file is in
../shared/data/eval_sets/mt_bench/). ``single-v1`` is kept once, in
gleaner.tasks.compare.grading (GPT-4-LLM's 1-10 grading uses it too). As in
FastChat's ``gen_judgment.py``: the first turn is graded with ``single-v1``, the
second with ``single-v1-multi-turn`` (the whole conversation is shown, the
second answer is graded); questions of the categories in :data:`NEED_REF_CATS`
use the ``single-math-v1`` pair with GPT-4's reference answers. The judge's
``[[rating]]`` is read by gleaner.tasks.compare.grading.parse_rating.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from gleaner.tasks.compare.grading import GRADING_SYSTEM, GRADING_TEMPLATE

NEED_REF_CATS = ("math", "reasoning", "coding")  # FastChat's (besides arena-hard-200)

_RATE = ("After providing your explanation, you must rate the response on a scale of 1 to 10 by "
         "strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".")
_CONVERSATION = (
    "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n"
    "### Assistant A:\n{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n"
    "<|The End of Assistant A's Conversation with User|>")
_REFERENCES = (
    "<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n"
    "{ref_answer_1}\n\n### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n"
    "<|The End of Reference Answer|>\n\n\n")


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    system: str
    template: str
    multi_turn: bool
    reference: bool


SINGLE = JudgePrompt("single-v1", GRADING_SYSTEM, GRADING_TEMPLATE, False, False)
SINGLE_MATH = JudgePrompt(
    "single-math-v1", "You are a helpful assistant.",
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response "
    "provided by an AI assistant to the user question displayed below. Your evaluation should "
    "consider correctness and helpfulness. You will be given a reference answer and the "
    "assistant's answer. Begin your evaluation by comparing the assistant's answer with the "
    "reference answer. Identify and correct any mistakes. Be as objective as possible. "
    + _RATE + "\n\n[Question]\n{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}\n"
    "[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]", False, True)
SINGLE_MULTI_TURN = JudgePrompt(
    "single-v1-multi-turn",
    "Please act as an impartial judge and evaluate the quality of the response provided by an "
    "AI assistant to the user question displayed below. Your evaluation should consider factors "
    "such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the "
    "response. You evaluation should focus on the assistant's answer to the second user "
    "question. Begin your evaluation by providing a short explanation. Be as objective as "
    "possible. " + _RATE + "\n\n", _CONVERSATION, True, False)
SINGLE_MATH_MULTI_TURN = JudgePrompt(
    "single-math-v1-multi-turn",
    "Please act as an impartial judge and evaluate the quality of the response provided by an "
    "AI assistant to the user question. Your evaluation should consider correctness and "
    "helpfulness. You will be given a reference answer and the assistant's answer. You "
    "evaluation should focus on the assistant's answer to the second question. Begin your "
    "evaluation by comparing the assistant's answer with the reference answer. Identify and "
    "correct any mistakes. Be as objective as possible. " + _RATE + "\n\n",
    _REFERENCES + _CONVERSATION, True, True)
PROMPTS = (SINGLE, SINGLE_MATH, SINGLE_MULTI_TURN, SINGLE_MATH_MULTI_TURN)
PROMPT_VERSION = hashlib.sha256("\x00".join(
    f"{p.name}\x00{p.system}\x00{p.template}" for p in PROMPTS).encode()).hexdigest()[:12]


def judge_prompt(category: str, turn: int) -> JudgePrompt:
    """The prompt FastChat grades ``turn`` (1 or 2) of a question of ``category`` with."""
    reference = category in NEED_REF_CATS
    if turn == 1:
        return SINGLE_MATH if reference else SINGLE
    return SINGLE_MATH_MULTI_TURN if reference else SINGLE_MULTI_TURN


def grading_messages(prompt: JudgePrompt, questions: list[str], answers: list[str],
                     references: list[str] | None) -> list[dict[str, str]]:
    """System and user message of one grading request (FastChat's ``run_judge_single``)."""
    fields: dict[str, str] = {}
    if prompt.reference:
        if not references:
            raise ValueError(f"{prompt.name} grades against a reference answer: none given")
        fields["ref_answer_1"] = references[0]
        if prompt.multi_turn:
            fields["ref_answer_2"] = references[1]
    if prompt.multi_turn:
        user = prompt.template.format(question_1=questions[0], question_2=questions[1],
                                      answer_1=answers[0], answer_2=answers[1], **fields)
    else:
        user = prompt.template.format(question=questions[0], answer=answers[0], **fields)
    return [{"role": "system", "content": prompt.system}, {"role": "user", "content": user}]
