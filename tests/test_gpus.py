"""GPUs asked for, where the cluster has none: a clear error naming the setting before any
work, from a training run and from an engine stage's resources; --num-gpus on the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gleaner.flows.cli import app
from tests.support.tiny_models import (  # noqa: F401  (fixtures, by their names)
    fixture_smol_tokenizer_dir,
    fixture_tiny_model_dir,
    fixture_tokenizer,
)
from tests.test_memory_plan import LLAMA_7B, config_only_folder


def test_a_stage_asking_for_gpus_the_cluster_lacks_is_refused(ray_local) -> None:
    from gleaner.config import GleanerConfig
    from gleaner.runtime import check_gpus

    config = GleanerConfig()
    with pytest.raises(ValueError, match=r"embed.resources.gpus asks for 1 GPU\(s\), but the "
                                         r"local Ray has 0"):
        check_gpus(config, 1, "embed.resources.gpus")
    check_gpus(config, 0, "embed.resources.gpus")  # CPU stages need none
    check_gpus(config.with_overrides({"ray.autoscaling": True}), 8, "embed.resources.gpus")


def test_training_on_gpus_the_cluster_lacks_is_refused_before_a_worker_starts(
        ray_local, tiny_model_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    from gleaner.config import GleanerConfig
    from gleaner.store import Store
    from gleaner.tasks.train.run import run_finetune
    from tests.test_finetune import write_pool_and_selection

    store = Store(str(tmp_path / "store"))
    write_pool_and_selection(store, "r", shared_data, pool=10, chosen=4)
    config = GleanerConfig().with_overrides({
        "store.url": store.url, "finetune.base_model": str(tiny_model_dir),
        "finetune.use_gpu": True, "finetune.num_workers": 2,
        "finetune.overrides": {"max_length": 64, "effective_batch_size": 4,
                               "per_device_batch_size": 2}})
    with pytest.raises(ValueError, match=r"finetune.num_workers x finetune.use_gpu asks for 2 "
                                         r"GPU\(s\), but the local Ray has 0"):
        run_finetune(store, "r", config)
    assert not (Path(store.run_path("r", "finetune", "curated", "ray")) / "train").exists()


def test_num_gpus_on_the_training_verbs(tmp_path: Path) -> None:
    llama_7b = config_only_folder(tmp_path / "llama-7b", **LLAMA_7B)
    runner = CliRunner()
    plan = runner.invoke(app, ["finetune", "--plan", "--base-model", str(llama_7b),
                               "--strategy", "fsdp", "--num-gpus", "8", "--examples", "9000",
                               "--json"])
    assert plan.exit_code == 0, plan.output
    shown = json.loads(plan.stdout.strip().splitlines()[-1])
    assert shown["world_size"] == 8 and shown["on_gpu"] is True
    for verb in (["finetune", "--plan"], ["reward", "train", "--run-id", "r"],
                 ["dpo", "train", "--run-id", "r"]):
        clash = runner.invoke(app, [*verb, "--num-gpus", "2", "--num-workers", "4"])
        assert clash.exit_code != 0 and "--num-gpus 2 means 2 workers" in clash.output, verb
        cpu = runner.invoke(app, [*verb, "--num-gpus", "2", "--cpu"])
        assert cpu.exit_code != 0 and "drop --cpu" in cpu.output, verb
