"""The fine-tune plan: per-GPU memory, batch arithmetic and steps from a model's config.json
alone, checked on well-known cases and against what a real model holds after one step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gleaner.config import load_config
from gleaner.flows.cli import app
from gleaner.tasks.train.memory_plan import (
    GIB,
    TrainingLayout,
    check_plan,
    model_shape,
    plan_for_section,
    plan_training,
)
from gleaner.tasks.train.recipes import build_recipe
from tests.support.tiny_models import (  # noqa: F401  (fixtures, by their names)
    fixture_smol_tokenizer_dir,
    fixture_tiny_model_dir,
)

ROOT = Path(__file__).resolve().parents[1]
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)


def config_only_folder(folder: Path, **shape: int) -> Path:
    """A folder holding only a Llama config.json: no weights, no tokenizer."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**shape).save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    return folder


@pytest.fixture(scope="module")
def llama_7b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return config_only_folder(tmp_path_factory.mktemp("llama-7b"), **LLAMA_7B)


@pytest.fixture(scope="module")
def llama_70b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return config_only_folder(tmp_path_factory.mktemp("llama-70b"), **LLAMA_70B)


def test_parameters_come_from_the_config_alone(llama_7b: Path, llama_70b: Path) -> None:
    assert model_shape(str(llama_7b)).parameters == 6_738_415_616  # Llama-2-7B
    assert model_shape(str(llama_70b)).parameters == 68_976_648_192  # Llama-2-70B


@pytest.mark.parametrize(("strategy", "peft", "world", "gpu_gb", "checkpointing", "fits"), [
    ("ddp", "none", 1, 80, False, False),  # 7B full fine-tune: ~108 GB of state on one GPU
    ("ddp", "none", 8, 80, False, False),  # DDP keeps all of it on every GPU
    ("fsdp", "none", 8, 80, False, True),  # full shard: an eighth each
    ("deepspeed", "none", 8, 80, False, True),
    ("ddp", "lora", 1, 24, True, True),  # bf16 base 13.5 GB + adapters
    ("ddp", "qlora", 1, 24, True, True),
])
def test_seven_b_cases(llama_7b: Path, strategy: str, peft: str, world: int, gpu_gb: int,
                       checkpointing: bool, fits: bool) -> None:
    recipe = build_recipe("alpaca", {"gradient_checkpointing": checkpointing})
    layout = TrainingLayout(strategy=strategy, peft=peft, world_size=world, gpu_memory_gb=gpu_gb)
    plan = plan_training(model_shape(str(llama_7b)), recipe, layout, examples=9229)
    assert plan.fits is fits, plan.reasons
    assert plan.effective_batch == 128 and plan.micro_batch * plan.accumulation * world == 128
    assert plan.steps == 3 * 73  # 9,229 examples / 128 = 73 steps an epoch, 3 epochs
    if peft == "none":
        state = plan.breakdown["weights"] + plan.breakdown["gradients"] + \
            plan.breakdown["optimizer"]
        shard = world if strategy != "ddp" else 1
        assert state == pytest.approx(16 * 6_738_415_616 / shard, rel=1e-4)
    else:
        assert plan.trained_parameters < 0.01 * plan.parameters


def test_a_70b_full_fine_tune_does_not_fit_eight_80gb_gpus(llama_70b: Path) -> None:
    plan = plan_training(model_shape(str(llama_70b)), build_recipe("alpaca"),
                         TrainingLayout(strategy="fsdp", world_size=8), examples=9229)
    assert not plan.fits
    assert plan.per_gpu_bytes > 16 * 68_976_648_192 / 8
    (reason,) = plan.reasons
    assert "GiB per GPU" in reason and "fsdp" in reason and "8 GPU(s)" in reason
    with pytest.raises(ValueError, match="refused before any worker starts"):
        check_plan(plan, "fine-tuning 'curated'")


def test_an_effective_batch_the_world_cannot_hit_is_refused_with_the_numbers(
        llama_7b: Path) -> None:
    plan = plan_training(model_shape(str(llama_7b)), build_recipe("alpaca"),
                         TrainingLayout(strategy="fsdp", world_size=3), examples=100)
    assert not plan.fits
    assert any("effective batch 128" in r and "micro-batch 4" in r and "world 3" in r
               for r in plan.reasons)


def test_lora_target_modules_the_model_lacks_are_refused(llama_7b: Path) -> None:
    layout = TrainingLayout(peft="lora", gpu_memory_gb=80, lora_target_modules=("c_attn",))
    plan = plan_training(model_shape(str(llama_7b)), build_recipe("alpaca"), layout, 10)
    assert not plan.fits and "c_attn" in plan.reasons[0] and "q_proj" in plan.reasons[0]


def test_planned_state_bytes_equal_what_a_tiny_model_holds_after_one_cpu_step(
        tmp_path: Path) -> None:
    """Weights, gradients and AdamW state of a real step (CPU: fp32) equal the plan's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer
    from trl import SFTConfig

    from gleaner.tasks.train.trainer_settings import RunLayout, training_arguments

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    folder = tmp_path / "tiny"
    config.save_pretrained(folder)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    recipe = build_recipe("alpaca")
    arguments = SFTConfig(**training_arguments(recipe, RunLayout(), output_dir=str(
        tmp_path / "out"), world_size=1, layer_class=None))
    trainer = Trainer(model=model, args=arguments)  # the optimizer every objective trains with
    optimizer = trainer.create_optimizer()
    ids = torch.randint(0, 512, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    held = {
        "weights": nbytes(model.parameters()),
        "gradients": nbytes(p.grad for p in model.parameters()),
        "optimizer": nbytes(v for state in optimizer.state.values() for v in state.values()
                            if torch.is_tensor(v)),
    }
    plan = plan_training(model_shape(str(folder)), recipe,
                         TrainingLayout(on_gpu=False), examples=10)
    assert {k: plan.breakdown[k] for k in held} == held
    assert plan.parameters == sum(p.numel() for p in model.parameters())


def test_the_shipped_examples_plan_as_their_comments_say(llama_7b: Path) -> None:
    for example, gpus, fits in (("gpu-7b.yaml", 8, True), ("lora-1gpu.yaml", 1, True),
                                ("openai.yaml", 4, True)):
        config = load_config(ROOT / "examples" / example, {})
        plan = plan_for_section(config.finetune, str(llama_7b), examples=9229)
        assert plan.fits is fits, (example, plan.reasons)
        assert plan.world_size == gpus and plan.effective_batch == 128


def test_cli_plan_json_and_refusal(llama_7b: Path) -> None:
    runner = CliRunner()
    args = ["finetune", "--plan", "--config", str(ROOT / "examples" / "gpu-7b.yaml"),
            "--base-model", str(llama_7b), "--examples", "9229", "--json"]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    shown = json.loads(ok.stdout.strip().splitlines()[-1])
    assert shown["fits"] is True and shown["effective_batch"] == 128
    assert shown["steps"] == 219 and shown["reasons"] == []
    assert 10 * GIB < shown["per_gpu_bytes"] < 72 * GIB

    refused = runner.invoke(app, [*args[:-1], "--strategy", "ddp"])
    assert refused.exit_code == 1
    assert "fits: NO" in refused.stdout and "GiB per GPU" in refused.stdout


def test_a_base_model_with_no_config_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["finetune", "--plan", "--examples", "10",
                                      "--base-model", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "finetune.base_model" in result.output and "nowhere" in result.output



def test_finetune_refuses_an_unfit_run_before_anything_starts(
        llama_7b: Path, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gleaner.runtime
    from gleaner.store import Store
    from tests.test_finetune import write_pool_and_selection

    write_pool_and_selection(Store(str(tmp_path / "store")), "r", shared_data, pool=20, chosen=6)

    def started(*args, **kwargs):  # a spy: the Prefect API and Ray start in here
        raise AssertionError("the execution environment was started")

    monkeypatch.setattr(gleaner.runtime, "execution_environment", started)
    result = CliRunner().invoke(app, [
        "finetune", "--run-id", "r", "--store", str(tmp_path / "store"),
        "--base-model", str(llama_7b), "--gpu", "--num-workers", "8", "--strategy", "ddp"])
    assert result.exit_code == 2, result.output
    assert "refused before any worker starts" in result.output
    assert "GiB per GPU" in result.output and "strategy ddp" in result.output


def test_a_layout_the_trainer_cannot_run_is_refused_naming_the_setting(
        tiny_model_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    from gleaner.config import GleanerConfig
    from gleaner.store import Store
    from gleaner.tasks.train.run import run_finetune
    from tests.test_finetune import write_pool_and_selection

    store = Store(str(tmp_path / "store"))
    write_pool_and_selection(store, "r", shared_data, pool=20, chosen=6)
    import importlib.util

    def absent(module: str) -> bool:
        return importlib.util.find_spec(module) is None

    cases = [  # what this machine's packages and devices cannot run, each refused by name
        ({"finetune.peft": "lora", "finetune.lora.target_modules": ["c_attn"]},
         "finetune.lora.target_modules c_attn: the model has no such linear module"),
        ({"finetune.peft": "lora", "finetune.lora.merge": False},
         "finetune.lora.merge false: a model of adapters alone"),
    ]
    if absent("deepspeed"):
        cases.append(({"finetune.strategy": "deepspeed"},
                      "finetune.strategy 'deepspeed': DeepSpeed is not"))
    if absent("flash_attn"):
        cases.append(({"finetune.attn_implementation": "flash_attention_2"},
                      "finetune.attn_implementation 'flash_attention_2': flash-attn is not "
                      "installed"))
    if absent("bitsandbytes"):
        cases.append(({"finetune.peft": "qlora"},
                      "finetune.peft 'qlora': bitsandbytes is not installed"))
    for overrides, message in cases:
        config = GleanerConfig().with_overrides({
            "store.url": str(tmp_path / "store"), "finetune.base_model": str(tiny_model_dir),
            "finetune.overrides": {"max_length": 64}, **overrides})
        with pytest.raises(ValueError, match=re.escape(message)):
            run_finetune(store, "r", config)
