"""Two-turn MT-Bench answers from one model, as FastChat's ``gen_model_answer`` makes them.

The first question is asked alone; the second is asked after the model's own
first answer (the conversation so far, in the model's training format:
gleaner.tasks.train.sft_data.conversation_prompt). Sampling follows FastChat's
temperature per category (greedy at 0: extraction, math, coding, reasoning),
seeded, so a rerun of the same model gives the same answers. Answers are a
checkpoint: one Parquet file per model, reused while the model version and
the questions are the same.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections import defaultdict
from pathlib import Path

import pyarrow as pa

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.store import Store
from gleaner.tasks.evaluate.generation import GenerationSettings, Generator
from gleaner.tasks.mtbench.questions import MTQuestion

log = logging.getLogger("gleaner.mt_bench")
ANSWER_SCHEMA = pa.schema([
    ("question_id", pa.int64()), ("category", pa.string()), ("question_1", pa.string()),
    ("question_2", pa.string()), ("answer_1", pa.string()), ("answer_2", pa.string()),
    ("model", pa.string()), ("model_version", pa.string()),
])
SAMPLING_FLOOR = 1e-4  # FastChat samples only above this temperature


def temperature(config: GleanerConfig, category: str) -> float:
    return config.mt_bench.temperatures.get(category, 0.7)


def two_turn_answers(generator: Generator, questions: list[MTQuestion], config: GleanerConfig
                     ) -> list[tuple[str, str]]:
    """(first, second) answer per question; questions grouped by their temperature."""
    groups: dict[float, list[int]] = defaultdict(list)
    for i, question in enumerate(questions):
        groups[temperature(config, question.category)].append(i)
    base = generator.settings
    out: list[tuple[str, str]] = [("", "")] * len(questions)
    for temp, members in sorted(groups.items()):
        generator.settings = dataclasses.replace(
            base, max_new_tokens=config.mt_bench.max_new_tokens,
            do_sample=temp >= SAMPLING_FLOOR, temperature=max(temp, SAMPLING_FLOOR))
        firsts = generator.answer_prompts(generator.conversation_prompts(
            [[{"role": "user", "content": questions[i].turns[0]}] for i in members]))
        seconds = generator.answer_prompts(generator.conversation_prompts(
            [[{"role": "user", "content": questions[i].turns[0]},
              {"role": "assistant", "content": first},
              {"role": "user", "content": questions[i].turns[1]}]
             for i, first in zip(members, firsts, strict=True)]))
        for i, first, second in zip(members, firsts, seconds, strict=True):
            out[i] = (first, second)
    generator.settings = base
    return out


def answer_mt_bench(store: Store, run_id: str, config: GleanerConfig, reference: str,
                    questions: list[MTQuestion]) -> pa.Table:
    """One model's two-turn answers (from the store when it holds them for this version)."""
    from gleaner.tasks.evaluate.run import label_of, resolve_model

    label = label_of(reference)
    path = layout.mt_bench_answers_path(store, run_id, label)
    with tempfile.TemporaryDirectory(prefix="gleaner-mt-bench-") as cache:
        model_dir, version = resolve_model(store, run_id, config, reference, Path(cache))
        if store.exists(path) and not config.evaluate.force:
            table = store.dataset([path]).to_table()
            if (table.column("question_id").to_pylist() == [q.question_id for q in questions]
                    and set(table.column("model_version").to_pylist()) == {version}):
                return table
        settings = GenerationSettings(batch_size=config.evaluate.generation_batch_size)
        generator = Generator(model_dir, settings)
        log.info("MT-Bench: %s answers %d questions in two turns", reference, len(questions))
        answers = two_turn_answers(generator, questions, config)
    table = pa.Table.from_pylist([
        {"question_id": q.question_id, "category": q.category, "question_1": q.turns[0],
         "question_2": q.turns[1], "answer_1": a1, "answer_2": a2, "model": reference,
         "model_version": version}
        for q, (a1, a2) in zip(questions, answers, strict=True)], schema=ANSWER_SCHEMA)
    store.write_table(path, table)
    return table
