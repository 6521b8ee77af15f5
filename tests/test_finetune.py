"""Fine-tuning: templates and the response-only label mask, recipe settings, and a real
Ray Train run of a tiny Llama (2 layers, hidden 64, SmolLM2's tokenizer) on CPU that
saves to the store, resumes from its checkpoint, reloads and generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gleaner.schema import Example
from gleaner.tasks.train.recipes import build_recipe
from gleaner.tasks.train.sft_data import (
    ALPACA_PROMPT_INPUT,
    IGNORE_INDEX,
    SftFormat,
    prepare_tokenizer,
    tokenise,
    tokenise_all,
)
from gleaner.tasks.train.trainer_settings import RunLayout, accumulation_steps
from tests.support.tiny_models import (  # noqa: F401  (fixtures, by their names)
    fixture_smol_tokenizer_dir,
    fixture_tiny_model_dir,
    fixture_tokenizer,
)


def record(instruction: str, output: str, input: str = "", history=()) -> dict:
    return Example("test", 0, instruction, input, output, list(history)).to_row()


def labelled_text(tokenizer, item) -> str:
    return tokenizer.decode([t for t in item.labels if t != IGNORE_INDEX])


# ---- templates and label masks -------------------------------------------------------------
def test_alpaca_template_masks_everything_but_the_response(tokenizer) -> None:
    fmt = SftFormat("alpaca")
    row = record("Name a colour.", "Blue is a colour.", input="Think of the sky.")
    item = tokenise(row, tokenizer, fmt, max_length=512)
    text = tokenizer.decode(item.input_ids)
    assert text.startswith(ALPACA_PROMPT_INPUT.format(instruction="Name a colour.",
                                                      input="Think of the sky."))
    assert "### Instruction:\nName a colour.\n\n### Input:\nThink of the sky.\n\n### Response:\n" \
        in text
    assert labelled_text(tokenizer, item) == "Blue is a colour." + tokenizer.eos_token
    first = next(i for i, t in enumerate(item.labels) if t != IGNORE_INDEX)
    assert all(t == IGNORE_INDEX for t in item.labels[:first])
    assert all(t != IGNORE_INDEX for t in item.labels[first:])  # response runs to the end
    no_input = tokenise(record("Say hi.", "Hi."), tokenizer, fmt, 512)
    assert "### Input:" not in tokenizer.decode(no_input.input_ids)


def test_conversations_use_the_chat_template_and_learn_every_assistant_turn(tokenizer) -> None:
    from gleaner.schema import Turn

    row = record("And 3+3?", "6.", history=[Turn("user", "2+2?"), Turn("assistant", "4.")])
    item = tokenise(row, tokenizer, SftFormat("alpaca"), 512)
    text = tokenizer.decode(item.input_ids)
    assert "<|im_start|>user\n2+2?<|im_end|>" in text and "### Instruction" not in text
    learned = labelled_text(tokenizer, item)
    assert learned == "4.<|im_end|>\n6.<|im_end|>\n"
    assert "2+2?" not in learned and "3+3" not in learned


def test_lima_end_of_turn_token_between_speakers(tokenizer) -> None:
    fmt = SftFormat("eot", "<|end_of_turn|>")
    assert prepare_tokenizer(tokenizer, fmt) is True  # a new token: embeddings must grow
    eot_id = tokenizer.convert_tokens_to_ids("<|end_of_turn|>")
    item = tokenise(record("Hello?", "Hi there."), tokenizer, fmt, 2048)
    assert item.input_ids.count(eot_id) == 2  # after the user turn and after the answer
    assert labelled_text(tokenizer, item) == "Hi there.<|end_of_turn|>"


def test_trimming_and_examples_with_no_response_left(tokenizer) -> None:
    rows = [record("Short?", "Yes."), record("word " * 300, "Answer."),
            record("Q", "long answer " * 200)]
    result = tokenise_all(rows, tokenizer, SftFormat("alpaca"), max_length=64)
    assert result.examples == 3
    assert result.trimmed == 2
    assert result.dropped_no_response == 1  # the 300-word prompt fills all 64 tokens
    assert len(result.sequences) == 2 and all(len(s.input_ids) <= 64 for s in result.sequences)
    assert result.counts()["examples"] == len(result.sequences) + result.dropped_no_response


def sft_trainer(model_dir: Path, tokenizer, recipe, rows: list[dict], tmp_path: Path,
                layout: RunLayout = RunLayout()):
    """The trainer the Ray Train worker builds (same objective, same arguments), in-process."""
    import pyarrow as pa
    from transformers import AutoModelForCausalLM

    from gleaner.tasks.train.finetune import sequences_table
    from gleaner.tasks.train.objectives import CausalLM
    from gleaner.tasks.train.trainer_settings import training_arguments

    items = tokenise_all(rows, tokenizer, SftFormat(recipe.template), recipe.max_length)
    table: pa.Table = sequences_table(items.sequences)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    arguments = training_arguments(recipe, layout, output_dir=str(tmp_path / "out"),
                                   world_size=1, layer_class="LlamaDecoderLayer")
    return CausalLM().trainer(model, arguments, table, tokenizer, None, recipe), items


def test_packed_loss_equals_the_loss_of_the_examples_alone(
        tiny_model_dir: Path, tokenizer, tmp_path: Path) -> None:
    """TRL's padding-free packing: one packed row, position ids restarting per example, no
    attention across examples: its loss is the token-weighted loss of each example alone."""
    import torch

    from gleaner.tasks.train.worker import check_packing_keeps_examples_apart

    recipe = build_recipe("alpaca", {"packing": True, "max_length": 256,
                                     "per_device_batch_size": 4, "effective_batch_size": 4})
    rows = [record(f"Question {i}?", "An answer " * (i + 1)) for i in range(4)]
    trainer, items = sft_trainer(tiny_model_dir, tokenizer, recipe, rows, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one packed row
    assert int((batch["position_ids"][0] == 0).sum()) == 4  # four examples, positions restart
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       labels=batch["labels"]).loss
        token_losses, tokens = 0.0, 0
        for item in items.sequences:
            ids, labels = torch.tensor([item.input_ids]), torch.tensor([item.labels])
            counted = int((labels[0, 1:] != IGNORE_INDEX).sum())
            token_losses += model(input_ids=ids, labels=labels).loss.item() * counted
            tokens += counted
    assert packed.item() == pytest.approx(token_losses / tokens, rel=1e-4)
    check_packing_keeps_examples_apart(model, RunLayout())  # the worker's own check passes


# ---- recipes: the trainer arguments each one builds ----------------------------------------
def learning_rates(trainer, steps: int) -> list[float]:
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    lrs = []
    for _ in range(steps + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_alpaca_preset_trainer_arguments_optimizer_and_cosine_schedule(
        tiny_model_dir: Path, tokenizer, tmp_path: Path) -> None:
    recipe = build_recipe("alpaca")
    assert (recipe.learning_rate, recipe.epochs, recipe.effective_batch_size,
            recipe.max_length, recipe.scheduler, recipe.warmup_ratio, recipe.bf16) == (
        2e-5, 3.0, 128, 512, "cosine", 0.03, True)
    trainer, _ = sft_trainer(tiny_model_dir, tokenizer, recipe, [record("Q?", "A.")], tmp_path)
    args = trainer.args
    assert (args.learning_rate, args.num_train_epochs, args.per_device_train_batch_size,
            args.gradient_accumulation_steps, args.max_length, args.lr_scheduler_type.value,
            args.bf16, args.packing) == (2e-5, 3.0, 4, 32, 512, "cosine", False, False)
    lrs = learning_rates(trainer, 100)  # 3 warm-up steps
    assert all(g["betas"] == (0.9, 0.999) and g["weight_decay"] == 0.0
               for g in trainer.optimizer.param_groups)
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(2e-5 / 3)
    assert lrs[3] == pytest.approx(2e-5)  # peak after warm-up
    assert lrs[3 + 97 // 2] == pytest.approx(1e-5, rel=0.05)  # cosine: half-way = half
    assert lrs[-2] < 1e-7
    assert accumulation_steps(recipe, world_size=4) == 8  # 4 per device x 4 workers x 8
    with pytest.raises(ValueError, match="not a multiple of micro-batch 4 x 3 workers"):
        accumulation_steps(recipe, world_size=3)


def test_lima_preset_trainer_arguments_optimizer_linear_decay_and_size_rule(
        tiny_model_dir: Path, tokenizer, tmp_path: Path) -> None:
    large = build_recipe("lima", model_params=65_000_000_000)
    small = build_recipe("lima", model_params=7_000_000_000)
    assert (large.effective_batch_size, large.residual_dropout_top) == (32, 0.3)
    assert (small.effective_batch_size, small.residual_dropout_top) == (64, 0.2)
    assert (small.epochs, small.max_length, small.warmup_ratio, small.template) == (
        15.0, 2048, 0.0, "eot")
    prepare_tokenizer(tokenizer, SftFormat("eot", small.end_of_turn_token))
    trainer, _ = sft_trainer(tiny_model_dir, tokenizer, small, [record("Q?", "A.")], tmp_path)
    assert (trainer.args.weight_decay, trainer.args.adam_beta2, trainer.args.num_train_epochs,
            trainer.args.gradient_accumulation_steps) == (0.1, 0.95, 15.0, 32)
    lrs = learning_rates(trainer, 10)
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["betas"] == no_decay["betas"] == (0.9, 0.95)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert lrs[0] == pytest.approx(1e-5)  # no warm-up
    assert lrs[5] == pytest.approx(5.5e-6)  # straight line
    assert lrs[10] == pytest.approx(1e-6)
    overridden = build_recipe("lima", {"learning_rate": 3e-5, "epochs": 1}, 7_000_000_000)
    assert (overridden.learning_rate, overridden.epochs, overridden.weight_decay) == (3e-5, 1, 0.1)
    with pytest.raises(ValueError, match="unknown finetune override.*learning_rat"):
        build_recipe("alpaca", {"learning_rat": 1})


def test_residual_dropout_rises_linearly_and_only_in_training(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from gleaner.tasks.train.finetune import add_residual_dropout

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model.eval()
    before = model(ids).logits
    assert add_residual_dropout(model, 0.3) == [0.0, 0.3]
    assert torch.equal(model(ids).logits, before)  # eval: no dropout
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(ids).logits, before)


# ---- the real Ray Train path ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.e2e  # a model's whole life: fit, checkpoint, resume, reload, use
def test_ray_train_fit_saves_resumes_reloads_and_generates(
        ray_local, tiny_model_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    import pyarrow as pa

    from gleaner.config import GleanerConfig
    from gleaner.engine import PlanMismatch
    from gleaner.store import Store
    from gleaner.tasks.evaluate.eval_sets import EvalPrompt
    from gleaner.tasks.evaluate.generation import GenerationSettings, Generator
    from gleaner.tasks.train.run import model_path, run_finetune

    rows = json.loads((shared_data / "alpaca" / "alpaca_random_9k.json").read_text())[:12]
    table = pa.Table.from_pylist(
        [Example("alpaca", i, r["instruction"], r["input"], r["output"]).to_row()
         for i, r in enumerate(rows)])
    store = Store(str(tmp_path / "store"))
    overrides = {"max_steps": 2, "effective_batch_size": 4, "per_device_batch_size": 2,
                 "max_length": 128, "checkpoint_every_steps": 1, "learning_rate": 1e-3}
    config = GleanerConfig().with_overrides({
        "finetune.base_model": str(tiny_model_dir), "finetune.overrides": overrides})

    first = run_finetune(store, "ft-run", config, table, name="curated")
    assert first["steps"] == 2 and first["resumed_from_step"] is None
    assert first["data"]["examples"] == 12
    metrics = store.read_json(store.run_path("ft-run", "finetune", "curated", "metrics.json"))
    assert [h["step"] for h in metrics["history"]] == [1, 2]
    assert all(h["loss"] > 0 for h in metrics["history"])
    assert metrics["tokens_per_s"] > 0 and metrics["device"] == "cpu"
    assert metrics["gradient_accumulation"] == 2
    saved = Path(model_path(store, "ft-run", "curated"))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "gleaner_sft.json"):
        assert (saved / name).exists(), name
    checkpoints = list(Path(store.run_path("ft-run", "finetune", "curated", "ray")).rglob(
        "trainer_state.json"))
    assert checkpoints, "Ray Train persisted no checkpoint into the store"

    # Same run, longer budget: Ray Train restores the last checkpoint from the store.
    again = config.with_overrides({"finetune.overrides": {**overrides, "max_steps": 4}})
    resumed = run_finetune(store, "ft-run", again, table, name="curated")
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    metrics = store.read_json(store.run_path("ft-run", "finetune", "curated", "metrics.json"))
    assert [h["step"] for h in metrics["history"]] == [1, 2, 3, 4]  # one unbroken loss curve

    reused = run_finetune(store, "ft-run", again, table, name="curated")
    assert reused["reused"] is True and reused["steps"] == 4
    # the key: the recipe and the data are in it (refused), the layout is not
    with pytest.raises(PlanMismatch, match=r"recipe"):
        run_finetune(store, "ft-run", again.with_overrides(
            {"finetune.overrides": {**overrides, "max_steps": 4, "learning_rate": 5e-4}}),
            table, name="curated")
    with pytest.raises(PlanMismatch, match=r"cannot be made shorter"):
        run_finetune(store, "ft-run", config, table, name="curated")
    assert run_finetune(store, "ft-run", again.with_overrides({"finetune.strategy": "fsdp"}),
                        table, name="curated")["reused"] is True
    # --force starts afresh: the checkpoints of the run on record are gone
    fresh = run_finetune(store, "ft-run", config.with_overrides({"finetune.force": True}),
                         table, name="curated")
    assert fresh["resumed_from_step"] is None and fresh["steps"] == 2
    # other data (another selection of the run) trains afresh too, never from the old steps
    other = run_finetune(store, "ft-run", config, table.slice(0, 10), name="curated")
    assert other["reused"] is False and other["resumed_from_step"] is None
    assert other["data"]["examples"] == 10

    generator = Generator(str(saved), GenerationSettings(max_new_tokens=5, batch_size=2))
    assert generator.renderer.format.template == "alpaca"
    prompts = [EvalPrompt("t", str(i), r["instruction"], r["input"])
               for i, r in enumerate(rows[:3])]
    assert generator.renderer.prompts(prompts)[0].endswith("### Response:\n")
    answers = generator.answer(prompts)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def write_pool_and_selection(store, run_id: str, shared_data: Path, pool: int, chosen: int):
    """An ingest stage of real Alpaca rows and a selection manifest choosing the first few."""
    import pyarrow as pa

    rows = json.loads((shared_data / "alpaca" / "alpaca_random_9k.json").read_text())[:pool]
    table = pa.Table.from_pylist(
        [Example("alpaca", i, r["instruction"], r["input"], r["output"]).to_row()
         for i, r in enumerate(rows)])
    store.write_part(run_id, "ingest", 0, table)
    ids = table.column("id").to_pylist()
    store.write_part(run_id, "select", 0, pa.table({
        "id": ids, "selected": [i < chosen for i in range(len(ids))]}))
    return table


def test_curated_set_and_baselines_come_from_the_run(shared_data: Path, tmp_path: Path) -> None:
    from gleaner.config import GleanerConfig
    from gleaner.store import Store
    from gleaner.tasks.train.run import baseline_examples, resolve_dataset

    store = Store(str(tmp_path / "store"))
    pool = write_pool_and_selection(store, "r1", shared_data, pool=40, chosen=10)
    config = GleanerConfig()
    curated = resolve_dataset(store, "r1", config, None)
    assert sorted(curated.column("id").to_pylist()) == sorted(pool.column("id").to_pylist()[:10])
    assert baseline_examples(store, "r1", config, "pool", 10).num_rows == 40
    random_a = baseline_examples(store, "r1", config, "random", 10).column("id").to_pylist()
    random_b = baseline_examples(store, "r1", config, "random", 10).column("id").to_pylist()
    assert len(random_a) == len(set(random_a)) == 10 and random_a == random_b  # seeded
    other = config.with_overrides({"finetune.baseline_seed": 1})
    assert baseline_examples(store, "r1", other, "random", 10).column("id").to_pylist() != random_a
    with pytest.raises(ValueError, match="fewer than the curated set"):
        baseline_examples(store, "r1", config, "random", 41)


@pytest.mark.slow
def test_cli_finetune_lima_preset_with_random_baseline(
        ray_local, tiny_model_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gleaner.flows.cli import app
    from gleaner.store import Store
    from gleaner.tasks.train.sft_data import FORMAT_FILE

    store = Store(str(tmp_path / "store"))
    write_pool_and_selection(store, "cli-run", shared_data, pool=30, chosen=6)
    result = CliRunner().invoke(app, [
        "finetune", "--run-id", "cli-run", "--store", str(tmp_path / "store"), "--preset", "lima",
        "--base-model", str(tiny_model_dir), "--baseline", "random", "--max-steps", "1",
        "--batch-size", "2", "--per-device-batch-size", "2", "--max-length", "96", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    curated, baseline = summary["curated"], summary["baseline"]
    from gleaner.flows.commands.train_eval import finetune_text

    human = finetune_text(summary)
    assert "curated: 6 examples" in human and "baseline: 6 examples" in human
    assert curated["data"]["examples"] == baseline["data"]["examples"] == 6
    assert curated["preset"] == "lima" and curated["recipe"]["weight_decay"] == 0.1
    assert curated["recipe"]["residual_dropout_top"] == 0.2  # a small model: LIMA's 0.2
    metrics = store.read_json(store.run_path("cli-run", "finetune", "curated", "metrics.json"))
    assert metrics["residual_dropout_rates"] == [0.0, 0.2]
    saved = Path(store.run_path("cli-run", "finetune", "curated", "model"))
    assert json.loads((saved / FORMAT_FILE).read_text())["template"] == "eot"
    card = (saved / "README.md").read_text()  # the model card: base, data, recipe, training
    assert card.startswith("---\n") and f"base_model: {tiny_model_dir}" in card
    assert "run `cli-run`, stage `select`: 6 examples" in card
    assert "| weight_decay | 0.1 |" in card and "| strategy | ddp |" in card
    config = json.loads((saved / "config.json").read_text())
    from transformers import AutoTokenizer

    assert config["vocab_size"] == len(AutoTokenizer.from_pretrained(saved))  # EOT token added
    from gleaner.tasks.evaluate.eval_sets import EvalPrompt
    from gleaner.tasks.evaluate.generation import GenerationSettings, Generator

    generator = Generator(str(saved), GenerationSettings(max_new_tokens=4))
    prompt = EvalPrompt("t", "1", "Name a colour.")
    renderer = generator.renderer
    assert renderer.prompts([prompt]) == ["Name a colour.<|end_of_turn|>"]
    assert renderer.tokenizer.convert_tokens_to_ids("<|end_of_turn|>") in renderer.stop_ids
    assert len(generator.answer([prompt])) == 1


@pytest.mark.slow
def test_checkpoints_and_model_go_to_s3(ray_local, s3, tiny_model_dir: Path, shared_data: Path):
    """The store on S3 (moto's real HTTP server): Ray Train persists checkpoints through the
    store's fsspec filesystem, the final model is uploaded beside them."""
    from gleaner.config import GleanerConfig
    from gleaner.store import Store
    from gleaner.tasks.train.run import run_finetune

    store = Store(s3["url"], {"endpoint_url": s3["endpoint_url"]})
    write_pool_and_selection(store, "s3-run", shared_data, pool=8, chosen=4)
    config = GleanerConfig().with_overrides({
        "store.url": s3["url"], "store.options": {"endpoint_url": s3["endpoint_url"]},
        "finetune.base_model": str(tiny_model_dir),
        "finetune.overrides": {"max_steps": 1, "effective_batch_size": 2,
                               "per_device_batch_size": 2, "max_length": 64}})
    summary = run_finetune(store, "s3-run", config, None, name="curated")
    assert summary["steps"] == 1 and summary["model"].startswith("s3://")
    model = store.run_path("s3-run", "finetune", "curated", "model")
    assert store.exists(f"{model}/model.safetensors") and store.exists(f"{model}/gleaner_sft.json")
    states = [p for p in store.fs.find(store.run_path("s3-run", "finetune", "curated", "ray"))
              if p.endswith("trainer_state.json")]
    assert states, "no Ray Train checkpoint in the S3 store"


@pytest.mark.slow
def test_lora_adapters_train_are_saved_and_merged_and_the_merged_model_equals_them(
        ray_local, tiny_model_dir: Path, tmp_path: Path) -> None:
    """finetune.peft lora on TRL's trainer in Ray Train: only the adapters train; the published
    model is the base with them merged in, and its logits equal base + adapters (PEFT)."""
    import pyarrow as pa
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gleaner.config import GleanerConfig
    from gleaner.store import Store
    from gleaner.tasks.train.run import model_path, run_finetune

    table = pa.Table.from_pylist([record(f"Question {i}?", f"Answer {i}.") for i in range(8)])
    store = Store(str(tmp_path / "store"))
    config = GleanerConfig().with_overrides({
        "finetune.base_model": str(tiny_model_dir), "finetune.peft": "lora",
        "finetune.lora.rank": 4, "finetune.lora.target_modules": ["q_proj", "v_proj"],
        "finetune.overrides": {"max_steps": 3, "effective_batch_size": 4,
                               "per_device_batch_size": 4, "max_length": 64,
                               "learning_rate": 5e-2}})
    summary = run_finetune(store, "lora-run", config, table, name="curated")
    assert summary["peft"] == "lora" and summary["steps"] == 3
    published = Path(model_path(store, "lora-run", "curated"))
    adapter = published / "adapter"
    assert (adapter / "adapter_config.json").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4

    ids = torch.tensor([[1, 5, 9, 14, 20, 33]])
    merged = AutoModelForCausalLM.from_pretrained(published).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        with_adapters = PeftModel.from_pretrained(base, adapter).eval()(ids).logits
        merged_logits = merged(ids).logits
    assert not torch.allclose(with_adapters, base_logits, atol=1e-4)  # the adapters learned
    assert torch.allclose(merged_logits, with_adapters, atol=1e-5)
    base_state = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    changed = {name for name, weight in merged.state_dict().items()
               if not torch.equal(weight, base_state[name])}
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed)  # nothing else


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.slow
def test_fsdp_and_ddp_reach_the_same_losses_and_fsdp_ranks_hold_half_the_parameters(
        ray_local, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two Ray Train workers over gloo on CPU (on GPUs where there are two), TRL's trainer:
    DDP (shards, accumulation, the all-reduced loss and token counts as on several GPUs)
    and FSDP2 full shard reach the same losses; each FSDP rank holds half the model."""
    import pyarrow as pa

    from gleaner.config import GleanerConfig
    from gleaner.store import Store
    from gleaner.tasks.train.finetune import count_parameters
    from gleaner.tasks.train.run import run_finetune

    table = pa.Table.from_pylist([record(f"Question {i}?", f"Answer {i}.") for i in range(50)])
    store = Store(str(tmp_path / "store"))
    runs, metrics = {}, {}
    for strategy in ("ddp", "fsdp"):
        config = GleanerConfig().with_overrides({
            "finetune.base_model": str(tiny_model_dir), "finetune.strategy": strategy,
            "finetune.num_workers": 2, "finetune.use_gpu": cuda_devices() >= 2,
            "finetune.overrides": {"max_steps": 10, "effective_batch_size": 4, "bf16": False,
                                   "per_device_batch_size": 1, "max_length": 64}})
        runs[strategy] = run_finetune(store, f"{strategy}-run", config, table, name="curated")
        metrics[strategy] = store.read_json(store.run_path(f"{strategy}-run", "finetune",
                                                           "curated", "metrics.json"))
    losses = {k: [h["loss"] for h in m["history"]] for k, m in metrics.items()}
    assert len(losses["ddp"]) == 10 and all(loss > 0 for loss in losses["ddp"])
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-4)
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert (ddp["strategy"], fsdp["strategy"]) == ("ddp", "fsdp")
    for summary, record_ in ((ddp, metrics["ddp"]), (fsdp, metrics["fsdp"])):
        assert summary["steps"] == 10 and record_["world_size"] == 2
        assert record_["gradient_accumulation"] == 2  # 1 per device x 2 workers x 2 = 4
        # 10 steps x 4 examples of 50 near-equal ones: ~80 % of all tokens, summed over both
        # workers (rank 0's share alone would be ~40 %)
        seen = sum(h["tokens"] for h in record_["history"])
        assert 0.7 * summary["data"]["tokens"] <= seen <= 0.9 * summary["data"]["tokens"]
    whole = count_parameters(str(tiny_model_dir))
    assert ddp["rank_parameters"] == [whole, whole]  # every DDP rank holds the whole model
    assert all(abs(n - whole / 2) < 0.1 * whole for n in fsdp["rank_parameters"])
    assert sum(fsdp["rank_parameters"]) == pytest.approx(whole, rel=0.01)


def gpu_extra_ready() -> bool:
    import importlib.util

    return cuda_devices() >= 2 and all(importlib.util.find_spec(m) is not None
                                       for m in ("deepspeed", "bitsandbytes"))


@pytest.mark.slow
@pytest.mark.skipif(not gpu_extra_ready(), reason=(
    "DeepSpeed ZeRO-3 and QLoRA run on CUDA only (DeepSpeed's ZeRO-3 partitioning and "
    "bitsandbytes' 4-bit kernels need GPUs): this needs 2 GPUs and the gpu extra "
    "(pip install 'gleaner[gpu]'); on CPU both are refused by name before any worker starts "
    "(tests/test_memory_plan.py)"))
def test_deepspeed_zero3_shards_and_qlora_trains_adapters_on_gpus(
        ray_local, tiny_model_dir: Path, tmp_path: Path) -> None:
    import pyarrow as pa

    from gleaner.config import GleanerConfig
    from gleaner.store import Store
    from gleaner.tasks.train.finetune import count_parameters
    from gleaner.tasks.train.run import run_finetune

    table = pa.Table.from_pylist([record(f"Question {i}?", f"Answer {i}.") for i in range(16)])
    store = Store(str(tmp_path / "store"))
    overrides = {"max_steps": 2, "effective_batch_size": 4, "per_device_batch_size": 2,
                 "max_length": 64}
    zero3 = run_finetune(store, "zero3", GleanerConfig().with_overrides({
        "finetune.base_model": str(tiny_model_dir), "finetune.strategy": "deepspeed",
        "finetune.num_workers": 2, "finetune.use_gpu": True, "finetune.overrides": overrides}),
        table, name="curated")
    whole = count_parameters(str(tiny_model_dir))
    assert zero3["strategy"] == "deepspeed" and zero3["world_size"] == 2
    assert all(abs(n - whole / 2) < 0.1 * whole for n in zero3["rank_parameters"])
    qlora = run_finetune(store, "qlora", GleanerConfig().with_overrides({
        "finetune.base_model": str(tiny_model_dir), "finetune.peft": "qlora",
        "finetune.use_gpu": True, "finetune.overrides": overrides}), table, name="curated")
    assert qlora["peft"] == "qlora" and qlora["steps"] == 2
    assert (Path(store.run_path("qlora", "finetune", "curated", "model")) / "config.json"
            ).exists()


class _DiesOnce:
    """A trainer callback that kills its worker process at ``step`` the first time only (a
    marker file remembers), as a node lost mid-run would. It waits a few seconds first: Ray
    Train's controller learns of a reported checkpoint when it next polls the worker, and
    a real step is that long."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def __call__(self, trainer):
        import os
        import time

        from transformers import TrainerCallback

        step, marker = self.step, self.marker

        class Die(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step and not os.path.exists(marker):
                    open(marker, "w").close()
                    time.sleep(5)
                    os._exit(1)

        trainer.add_callback(Die())
        return trainer


@pytest.mark.slow
@pytest.mark.e2e  # a worker lost mid-run, and Ray Train's restart of the whole run
def test_a_worker_killed_mid_run_resumes_from_the_last_checkpoint(
        ray_local, tiny_model_dir: Path, tokenizer, tmp_path: Path) -> None:
    """Ray Train restarts the run (finetune.max_failures) from the newest checkpoint in the
    store: the rerun's first step is the checkpoint's step + 1 and it ends at the step count an
    uninterrupted run ends at, with one unbroken loss curve."""
    import sys
    from dataclasses import dataclass

    import cloudpickle

    from gleaner.tasks.train.finetune import sequences_table, train
    from gleaner.tasks.train.objectives import CausalLM

    @dataclass(frozen=True)
    class KilledOnce(CausalLM):
        die: _DiesOnce | None = None

        def trainer(self, *args, **kwargs):
            return self.die(super().trainer(*args, **kwargs))

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    recipe = build_recipe("alpaca", {"max_steps": 5, "effective_batch_size": 2,
                                     "per_device_batch_size": 2, "max_length": 64,
                                     "checkpoint_every_steps": 2, "learning_rate": 1e-3})
    items = tokenise_all([record(f"Question {i}?", f"Answer {i}.") for i in range(12)],
                         tokenizer, SftFormat("alpaca"), 64)
    outcome = train(
        sequences=sequences_table(items.sequences), tokenizer=tokenizer, fmt=SftFormat("alpaca"),
        base_model=str(tiny_model_dir), recipe=recipe, layout=RunLayout(), num_workers=1,
        storage_path=str(tmp_path / "ray"), storage_filesystem=None, run_name="killed",
        local_dir=tmp_path / "final", max_failures=1,
        objective=KilledOnce(die=_DiesOnce(3, str(tmp_path / "died"))))
    assert (tmp_path / "died").exists()  # the worker did die at step 3
    state = outcome.state
    assert state["resumed_from_step"] == 2  # the checkpoint of step 2: the rerun begins at 3
    assert state["step"] == 5 and [h["step"] for h in state["history"]] == [1, 2, 3, 4, 5]
