"""The reward model: the loss is -log sigmoid(r_h - r_l) (checked against a direct computation
on a batch), held-out prompts are whole, and a real Ray Train run of a tiny Llama on CPU learns a
synthetic preference (held-out pairwise accuracy >= 0.9), checkpoints to the store, resumes, and
scores every example on the engine's actor pool for the selectors (MoDS' reward > 0.0)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gleaner.tasks.reward.data import heldout_prompts, split_pairs
from tests.support.tiny_models import (  # noqa: F401  (fixtures, by their names)
    fixture_smol_tokenizer_dir,
    fixture_tiny_model_dir,
    fixture_tokenizer,
)


def test_the_loss_is_minus_log_sigmoid_of_the_reward_difference(tiny_model_dir: Path,
                                                                 tokenizer, tmp_path) -> None:
    """The loss the reward model trains on (TRL's RewardTrainer, built as the Ray Train worker
    builds it, on a batch its own collator makes) and the held-out report's loss both equal
    -log sigmoid(r_h - r_l) computed text by text, with no padding at all."""
    import torch

    from gleaner.tasks.reward.objective import PairwiseReward, pairwise_loss, rewards
    from gleaner.tasks.train.recipes import build_recipe
    from gleaner.tasks.train.trainer_settings import RunLayout, training_arguments

    torch.manual_seed(0)
    objective = PairwiseReward()
    model = objective.load_model(str(tiny_model_dir), RunLayout())
    model.config.pad_token_id = tokenizer.pad_token_id
    texts = [("Q: colour? A: blue, the colour of the sky.", "Q: colour? A: no."),
             ("Q: 2+2? A: 4", "Q: 2+2? A: it is five, or maybe six, hard to say."),
             ("Q: hi A: hello!", "Q: hi A: go away")]
    ids = [(tokenizer(c)["input_ids"], tokenizer(r)["input_ids"]) for c, r in texts]
    recipe = build_recipe("reward", {"per_device_batch_size": 3, "effective_batch_size": 3})
    arguments = training_arguments(recipe, RunLayout(), output_dir=str(tmp_path / "out"),
                                   world_size=1, layer_class="LlamaDecoderLayer")
    trainer = objective.trainer(model, arguments, _pair_table(ids), tokenizer, None, recipe)
    batch = trainer.data_collator([{"chosen_ids": c, "rejected_ids": r} for c, r in ids])
    assert batch["input_ids"].shape[0] == 6  # chosen first, then rejected, padded
    model.eval()
    loss = trainer.compute_loss(model, batch)

    def reward(seq: list[int]) -> torch.Tensor:  # one text alone: no padding at all
        return model(input_ids=torch.tensor([seq])).logits[0, 0]

    with torch.no_grad():
        diffs = torch.stack([reward(c) - reward(r) for c, r in ids])
        direct = torch.mean(-torch.log(torch.sigmoid(diffs)))
        report_batch = objective.collate(objective.rows(_pair_table(ids)), tokenizer.pad_token_id)
        chosen, rejected = rewards(model, report_batch).chunk(2)
    assert loss.item() == pytest.approx(direct.item(), rel=1e-5)
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(direct.item(), rel=1e-5)
    assert loss.requires_grad  # it is what the trainer back-propagates


def _pair_table(ids):
    import pyarrow as pa

    return pa.table({"chosen_ids": [c for c, _ in ids], "rejected_ids": [r for _, r in ids]})


def test_heldout_pairs_are_whole_prompts() -> None:
    import pyarrow as pa

    prompts = [f"p{i}" for i in range(20) for _ in range(3)]  # 3 pairs per prompt
    table = pa.table({"prompt_id": prompts, "chosen": ["c"] * 60, "rejected": ["r"] * 60})
    train, held = split_pairs(table, 0.1, seed=0)
    held_prompts = set(held.column("prompt_id").to_pylist())
    assert len(held_prompts) == 2 and held.num_rows == 6  # 10 % of 20 prompts, all their pairs
    assert not held_prompts & set(train.column("prompt_id").to_pylist())
    assert heldout_prompts(prompts, 0.1, 0) == held_prompts  # seeded: the same every time
    assert heldout_prompts(prompts, 0.1, 1) != held_prompts
    assert heldout_prompts(["a", "b"], 0.5, 0) and len(heldout_prompts(["a", "b"], 0.99, 0)) == 1
    assert heldout_prompts(["a"], 0.5, 0) == set() and heldout_prompts(prompts, 0.0, 0) == set()


WORDS = ["river", "stone", "cloud", "apple", "window", "music", "paper", "garden", "light",
         "table", "ocean", "bread", "mountain", "letter", "clock", "candle"]


def synthetic_pairs(count: int, seed: int = 0) -> list[dict]:
    """Chosen responses end with "thanks", rejected ones with "whatever": the learnable cue."""
    from gleaner.tasks.compare.sources import prompt_id

    rng = random.Random(seed)
    rows = []
    for i in range(count):
        question = f"Question {i}: tell me about the {rng.choice(WORDS)}."
        turns = [{"role": "user", "content": question}]
        body = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))  # noqa: E731
        rows.append({"id": f"pair{i}", "prompt_id": prompt_id([("user", question)]),
                     "turns": turns, "instruction": question, "input": "",
                     "chosen": f"{body()} thanks", "rejected": f"{body()} whatever",
                     "chosen_score": 8.0, "rejected_score": 3.0, "margin": 5.0,
                     "chosen_id": f"c{i}", "rejected_id": f"r{i}", "chosen_sources": ["a"],
                     "rejected_sources": ["b"]})
    return rows


@pytest.mark.slow
@pytest.mark.e2e  # a model's whole life: fit, checkpoint, resume, reload, use
def test_reward_model_learns_a_preference_checkpoints_resumes_and_scores_a_run(
        prefect_api, ray_local, tiny_model_dir: Path, tmp_path: Path) -> None:
    import pyarrow as pa

    from gleaner.config import GleanerConfig
    from gleaner.flows.reward_flow import reward_score_flow
    from gleaner.schema import Example, examples_to_table
    from gleaner.store import Store
    from gleaner.tasks.compare.pairs import PAIRS_SCHEMA
    from gleaner.tasks.reward.train import run_reward_train

    store = Store(str(tmp_path / "store"))
    store.write_part("rm-run", "compare/pairs", 0,
                     pa.Table.from_pylist(synthetic_pairs(60), schema=PAIRS_SCHEMA))
    recipe = {"max_steps": 30, "effective_batch_size": 8, "per_device_batch_size": 8,
              "learning_rate": 2e-3, "warmup_ratio": 0.0, "max_length": 64, "epochs": 10,
              "checkpoint_every_steps": 15}
    config = GleanerConfig().with_overrides({
        "store.url": store.url, "reward.train.base_model": str(tiny_model_dir),
        "reward.train.overrides": recipe, "reward.train.heldout_fraction": 0.2})
    summary = run_reward_train(store, "rm-run", config)
    assert summary["steps"] == 30 and summary["device"] == "cpu" and summary["bf16"] is False
    assert summary["data"]["heldout_pairs"] == 12 and summary["data"]["train_pairs"] == 48
    assert summary["heldout_accuracy"] >= 0.9, summary
    card = Path(summary["model"].removeprefix("file://"), "README.md").read_text()
    assert "A reward model r(x, y) from" in card and "on 48 comparison pairs" in card
    metrics = store.read_json(store.run_path("rm-run", "finetune", "reward-model",
                                             "metrics.json"))
    assert metrics["eval"]["heldout_pairs"] == 12 and metrics["tokens_per_s"] > 0
    losses = [h["loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0]
    model_dir = Path(store.run_path("rm-run", "finetune", "reward-model", "model"))
    saved = json.loads((model_dir / "config.json").read_text())
    assert len(saved["id2label"]) == 1 and saved["architectures"] == [
        "LlamaForSequenceClassification"]
    assert (model_dir / "gleaner_reward.json").exists()
    assert (model_dir / "gleaner_sft.json").exists()
    assert list(Path(store.run_path("rm-run", "finetune", "reward-model", "ray")).rglob(
        "trainer_state.json")), "no Ray Train checkpoint in the store"

    longer = config.with_overrides({"reward.train.overrides": {**recipe, "max_steps": 32}})
    resumed = run_reward_train(store, "rm-run", longer)
    assert resumed["resumed_from_step"] == 30 and resumed["steps"] == 32
    assert run_reward_train(store, "rm-run", longer)["reused"] is True

    # Score a run's examples on the engine (actor pool), then MoDS' filter through the selector.
    pool = [Example("pool", i, f"Question {i}: tell me about the sea.", "",
                    f"{WORDS[i]} {WORDS[i + 1]} {'thanks' if i % 2 else 'whatever'}")
            for i in range(8)]
    store.write_part("rm-run", "ingest", 0, examples_to_table(pool))
    scored = reward_score_flow(run_id="rm-run", config=config.with_overrides(
        {"reward.resources.batch_size": 4}))
    assert (scored["examples"], scored["scored"], scored["failed"]) == (8, 8, 0)
    rows = {r["id"]: r for r in store.read_stage("rm-run", "reward").to_pylist()}
    good = [rows[e.id]["reward"] for e in pool if e.output.endswith("thanks")]
    bad = [rows[e.id]["reward"] for e in pool if e.output.endswith("whatever")]
    assert min(good) > max(bad)
    from gleaner.tasks.select.selectors import SelectRequest, run_selector
    from gleaner.tasks.select.stage import load_candidates

    data = load_candidates(store, "rm-run", need_vectors=False)
    threshold = (min(good) + max(bad)) / 2
    manifest = run_selector(data, "threshold", SelectRequest("reward", 0, 0.9, threshold, 0))
    kept = {i for i, s in zip(manifest.ids, manifest.selected, strict=True) if s}
    assert kept == {e.id for e in pool if e.output.endswith("thanks")}
    zero = run_selector(data, "threshold", SelectRequest("reward", 0, 0.9, 0.0, 0))
    assert sum(zero.selected) == sum(1 for r in rows.values() if r["reward"] >= 0.0)
