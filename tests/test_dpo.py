"""DPO on comparison pairs: the pairs read as preference rows in the policy's own format, and a
real Ray Train run of TRL's DPOTrainer on CPU that starts from the run's fine-tuned tiny Llama,
whose first loss is log 2 (policy = reference), and whose result answers like any model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gleaner.tasks.compare.preferences import preference_rows, preference_set
from gleaner.tasks.train.sft_data import SftFormat, alpaca_prompt, conversation_prompt
from tests.support.tiny_models import (  # noqa: F401  (fixtures, by their names)
    fixture_smol_tokenizer_dir,
    fixture_tiny_model_dir,
    fixture_tokenizer,
)
from tests.test_reward import synthetic_pairs


def test_pairs_become_preference_rows_in_the_policys_format(tokenizer) -> None:
    single, = synthetic_pairs(1)
    chat = {**single, "turns": [{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello!"},
                                {"role": "user", "content": single["instruction"]}]}
    alpaca = preference_rows([single, chat], tokenizer, SftFormat("alpaca"))
    assert alpaca[0]["prompt"] == alpaca_prompt(single["instruction"])
    assert alpaca[0]["chosen"] == single["chosen"] + tokenizer.eos_token
    assert alpaca[0]["rejected"] == single["rejected"] + tokenizer.eos_token
    assert alpaca[1]["prompt"] == conversation_prompt(chat["turns"], tokenizer,
                                                      SftFormat("alpaca"))
    assert "Hello!" in alpaca[1]["prompt"]  # earlier turns are part of the prompt
    eot = preference_rows([single], tokenizer, SftFormat("eot", "<|end_of_turn|>"))
    assert eot[0]["prompt"] == single["instruction"] + "<|end_of_turn|>"
    assert eot[0]["chosen"].endswith("thanks<|end_of_turn|>")

    long = {**single, "instruction": "word " * 200}
    measured = preference_set(preference_rows([single, long], tokenizer, SftFormat("alpaca")),
                              tokenizer, 64)
    assert measured.pairs == 2 and measured.trimmed == 1  # the long prompt's pair is cut
    assert measured.table.column_names == ["prompt", "chosen", "rejected"]
    assert measured.table.column("chosen").to_pylist() == [alpaca[0]["chosen"]] * 2


@pytest.mark.slow
@pytest.mark.e2e  # a DPO model's whole life: SFT first, DPO on its pairs, then it answers
def test_dpo_trains_from_the_runs_fine_tuned_model_and_answers_like_any_model(
        prefect_api, ray_local, tiny_model_dir: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    from typer.testing import CliRunner

    from gleaner.config import GleanerConfig
    from gleaner.flows.cli import app
    from gleaner.schema import Example
    from gleaner.store import Store
    from gleaner.tasks.compare.pairs import PAIRS_SCHEMA
    from gleaner.tasks.evaluate.eval_sets import EvalPrompt
    from gleaner.tasks.evaluate.generation import GenerationSettings, Generator
    from gleaner.tasks.train.run import model_path, run_finetune

    store = Store(str(tmp_path / "store"))
    sft = pa.Table.from_pylist([Example("t", i, f"Question {i}?", "", f"Answer {i}.").to_row()
                                for i in range(4)])
    run_finetune(store, "dpo-run", GleanerConfig().with_overrides({
        "finetune.base_model": str(tiny_model_dir),
        "finetune.overrides": {"max_steps": 1, "effective_batch_size": 4,
                               "per_device_batch_size": 4, "max_length": 64}}), sft)
    store.write_part("dpo-run", "compare/pairs", 0,
                     pa.Table.from_pylist(synthetic_pairs(20), schema=PAIRS_SCHEMA))
    result = CliRunner().invoke(app, [
        "dpo", "train", "--run-id", "dpo-run", "--store", store.url, "--max-steps", "4",
        "--learning-rate", "5e-3", "--batch-size", "8", "--per-device-batch-size", "8",
        "--max-length", "64", "--beta", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["start"] == "run `dpo-run`'s `curated` model" and summary["beta"] == 0.5
    assert summary["steps"] == 4 and summary["data"]["heldout_pairs"] == 2
    metrics = store.read_json(store.run_path("dpo-run", "finetune", "dpo", "metrics.json"))
    losses = [h["loss"] for h in metrics["history"]]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)  # policy = reference at step 1
    assert losses[-1] < losses[0]  # it learnt to prefer the chosen responses
    assert summary["reward_accuracy"] is not None

    saved = Path(model_path(store, "dpo-run", "dpo"))
    assert json.loads((saved / "gleaner_sft.json").read_text())["template"] == "alpaca"
    card = (saved / "README.md").read_text()  # the model card: start, data, recipe, training
    assert "DPO (Rafailov et al. 2023, beta 0.5) from run `dpo-run`'s `curated` model" in card
    assert "on 18 comparison pairs" in card and "| beta | 0.5 |" in card
    generator = Generator(str(saved), GenerationSettings(max_new_tokens=4))
    assert len(generator.answer([EvalPrompt("t", "1", "Name a colour.")])) == 1

    refused = CliRunner().invoke(app, ["dpo", "train", "--run-id", "other", "--store",
                                       store.url])
    assert refused.exit_code != 0 and "no comparison pairs" in refused.output

    # The same pairs published as preference data, then a policy trained on that version.
    published = CliRunner().invoke(app, ["preferences", "--run-id", "dpo-run", "--store",
                                         store.url, "--name", "prefs", "--json"])
    assert published.exit_code == 0, published.output
    trained = CliRunner().invoke(app, [
        "dpo", "train", "--run-id", "dpo-run", "--store", store.url, "--preferences", "prefs@1",
        "--config", str(write_name(tmp_path, "dpo-from-prefs")), "--max-steps", "2",
        "--learning-rate", "5e-3", "--batch-size", "8", "--per-device-batch-size", "8",
        "--max-length", "64", "--json"])
    assert trained.exit_code == 0, trained.output
    again = json.loads(trained.stdout.strip().splitlines()[-1])
    assert again["pairs_run"] == "dataset:prefs@1" and again["data"]["pairs"] == 20
    assert again["steps"] == 2 and again["model"].endswith("dpo-from-prefs/model")


def write_name(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"dpo:\n  name: {name}\n")
    return path
