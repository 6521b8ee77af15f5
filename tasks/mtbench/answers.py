"""Two-turn MT-Bench answers from one model, as FastChat's ``gen_model_answer`` makes them.

The first question is asked alone; the second is asked after the model's own
first answer (the conversation so far, in the model's training format:
gleaner.tasks.train.sft_data.conversation_prompt). Sampling follows FastChat's
temperature per category (greedy at 0: extraction, math, coding, reasoning),
seeded, so a rerun of the same model gives the same answers. Each turn is an
answer stage (gleaner.tasks.evaluate.answer_stage), so answers are checkpointed,
resumed and reused while the model version and the prompts are the same; the
two turns end in one Parquet file per model.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.store import Store
from gleaner.tasks.evaluate.answer_stage import answer_prompts
from gleaner.tasks.evaluate.backends import Sampling
from gleaner.tasks.evaluate.generation import PromptRenderer
from gleaner.tasks.mtbench.questions import MTQuestion

log = logging.getLogger("gleaner.mt_bench")
ANSWER_SCHEMA = pa.schema([
    ("question_id", pa.int64()), ("category", pa.string()), ("question_1", pa.string()),
    ("question_2", pa.string()), ("answer_1", pa.string()), ("answer_2", pa.string()),
    ("model", pa.string()), ("model_version", pa.string()),
])
Answer = Callable[[int, list[str], list[Sampling]], list[str]]  # turn, prompts -> answers


def temperature(config: GleanerConfig, category: str) -> float:
    return config.mt_bench.answers.temperatures.get(category, 0.7)


def sampling(config: GleanerConfig, question: MTQuestion) -> Sampling:
    """FastChat's: greedy at (about) 0, else sampling at the category's temperature."""
    return Sampling(config.mt_bench.answers.max_tokens, temperature(config, question.category))


def two_turn_answers(answer: Answer, renderer: PromptRenderer, questions: list[MTQuestion],
                     config: GleanerConfig) -> list[tuple[str, str]]:
    """(first, second) answer per question: every first turn, then every second turn asked
    after the model's own first answer."""
    samplings = [sampling(config, q) for q in questions]
    firsts = answer(1, renderer.conversation_prompts(
        [[{"role": "user", "content": q.turns[0]}] for q in questions]), samplings)
    seconds = answer(2, renderer.conversation_prompts(
        [[{"role": "user", "content": q.turns[0]}, {"role": "assistant", "content": first},
          {"role": "user", "content": q.turns[1]}]
         for q, first in zip(questions, firsts, strict=True)]), samplings)
    return list(zip(firsts, seconds, strict=True))


def answer_mt_bench(store: Store, run_id: str, config: GleanerConfig, reference: str,
                    questions: list[MTQuestion]) -> pa.Table:
    """One model's two-turn answers (each turn an answer stage: resumed and cached there)."""
    from gleaner.tasks.evaluate.run import label_of, resolve_model

    label = label_of(reference)
    with tempfile.TemporaryDirectory(prefix="gleaner-mt-bench-") as cache:
        model, renderer = resolve_model(store, run_id, config, reference, Path(cache))
        log.info("MT-Bench: %s answers %d questions in two turns", reference, len(questions))

        def answer(turn: int, prompts: list[str], samplings: list[Sampling]) -> list[str]:
            return answer_prompts(store, run_id, config,
                                  layout.mt_bench_generation_scope(label, turn), model,
                                  prompts, samplings)

        answers = two_turn_answers(answer, renderer, questions, config)
    table = pa.Table.from_pylist([
        {"question_id": q.question_id, "category": q.category, "question_1": q.turns[0],
         "question_2": q.turns[1], "answer_1": a1, "answer_2": a2, "model": reference,
         "model_version": model.version}
        for q, (a1, a2) in zip(questions, answers, strict=True)], schema=ANSWER_SCHEMA)
    store.write_table(layout.mt_bench_answers_path(store, run_id, label), table)
    return table
