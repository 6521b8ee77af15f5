"""DEITA's scorers trained on EVOL items: the raw template labels exactly the score token a
scorer reads after DEITA's prompt, and a real Ray Train run of a tiny Llama on CPU gives a
model the existing `hf` Scorer reads (expected score in [1, 6]) with a report against its
teacher (Spearman, MAE) on held-out seeds."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gleaner.tasks.deita.score import complexity_prompt, score_token_ids
from gleaner.tasks.train.sft_data import IGNORE_INDEX, SftFormat, generation_prompt, tokenise
from tests.support.tiny_models import (  # noqa: F401  (fixtures, by their names)
    fixture_smol_tokenizer_dir,
    fixture_tiny_model_dir,
    fixture_tokenizer,
)


def test_raw_template_labels_only_the_score_token_after_the_prompt(tokenizer) -> None:
    prompt = complexity_prompt("Name a colour.")
    item = tokenise({"instruction": prompt, "input": "", "output": "3"}, tokenizer,
                    SftFormat("raw"), 512)
    prompt_ids = tokenizer(prompt)["input_ids"]
    three = score_token_ids(tokenizer)[2]
    assert item.input_ids == [*prompt_ids, three, tokenizer.eos_token_id]  # tokenised apart
    assert item.labels == [IGNORE_INDEX] * len(prompt_ids) + [three, tokenizer.eos_token_id]
    assert generation_prompt(prompt, "", tokenizer, SftFormat("raw")) == prompt  # as scored
    cut = tokenise({"instruction": prompt, "input": "", "output": "3"}, tokenizer,
                   SftFormat("raw"), 10)
    assert cut.trimmed and len(cut.input_ids) == 10
    assert cut.input_ids == [*prompt_ids[-8:], three, tokenizer.eos_token_id]  # the end stays


def evol_items(seeds: int, rng: random.Random) -> list[dict]:
    """Complexity items: versions with "omega" the ranker scored 5, with "alpha" 2."""
    from gleaner.tasks.evol.items import item_id

    rows = []
    for s in range(seeds):
        seed_id = f"seed{s:02d}"
        for r in range(4):
            word = "omega" if (s + r) % 2 else "alpha"
            text = f"Task {rng.randint(0, 999)}: {word} question about item {r}."
            rows.append({"id": item_id(seed_id, "complexity", r), "kind": "complexity",
                         "seed_id": seed_id, "round": r, "method": "seed" if r == 0 else
                         "constraints", "parent_id": None, "instruction": text, "text": text,
                         "score": 5 if word == "omega" else 2})
    return rows


@pytest.mark.slow
@pytest.mark.e2e  # a model's whole life: fit, checkpoint, resume, reload, use
def test_trained_scorer_plugs_into_the_hf_scorer_and_is_reported_against_its_teacher(
        prefect_api, ray_local, tiny_model_dir: Path, tmp_path: Path) -> None:
    import pyarrow as pa

    from gleaner.config import GleanerConfig
    from gleaner.store import Store
    from gleaner.tasks.deita.score import HFScorer
    from gleaner.tasks.evol.items import ITEMS_SCHEMA
    from gleaner.tasks.evol.scorer import run_scorer_train

    store = Store(str(tmp_path / "store"))
    items = evol_items(10, random.Random(0))
    store.write_part("sc-run", "evol/complexity-items", 0,
                     pa.Table.from_pylist(items, schema=ITEMS_SCHEMA))
    config = GleanerConfig().with_overrides({
        "store.url": store.url, "evol.scorer.base_model": str(tiny_model_dir),
        "evol.scorer.heldout_fraction": 0.2,
        "evol.scorer.overrides": {"max_steps": 50, "epochs": 20, "effective_batch_size": 8,
                                  "per_device_batch_size": 8, "learning_rate": 3e-3,
                                  "warmup_ratio": 0.0, "scheduler": "constant", "max_length": 96,
                                  "checkpoint_every_steps": 50}})
    result = run_scorer_train(store, "sc-run", config, "complexity")
    assert result["name"] == "complexity-scorer" and result["recipe"]["template"] == "raw"
    assert (result["items"], result["seeds"], result["train_items"]) == (40, 10, 32)
    assert result["data"]["dropped_no_response_tokens"] == 0
    report = result["report"]
    assert report["heldout_items"] == 8 and report["use"].startswith(
        "gleaner score --run-id RUN --complexity-model ")
    assert report["mae"] is not None and report["spearman"] is not None
    assert report["spearman"] > 0.5 and report["mae"] < 1.5, report
    saved = store.read_json(store.run_path("sc-run", "finetune", "complexity-scorer",
                                           "report.json"))
    assert saved == report

    # The existing `hf` Scorer (what `gleaner score --complexity-model DIR` loads) reads it.
    folder = store.run_path("sc-run", "finetune", "complexity-scorer", "model")
    scorer = HFScorer(folder, device="cpu")
    omega, alpha = scorer.score([complexity_prompt("Task 1: omega question about item 9."),
                                 complexity_prompt("Task 1: alpha question about item 9.")])
    assert 1.0 <= alpha.value <= 6.0 and 1.0 <= omega.value <= 6.0
    assert omega.value > alpha.value + 1.0
