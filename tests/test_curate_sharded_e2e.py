"""`gleaner curate` on CPU with FSDP on two Ray Train workers and InsTag as an extra signal:
the run finishes, its fine-tune summary shows the sharding (each rank holds about half the
parameters), and the tag stage ran on the pool before selection. Every LLM call goes to a
loopback OpenAI server; the model is a tiny config-built Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.support.openai_server import OpenAIStub, request_text
from tests.support.pipeline import pipeline_responder, write_config, write_sample
from tests.support.tiny_models import (  # noqa: F401  (fixtures, by their names)
    fixture_smol_tokenizer_dir,
    fixture_tiny_model_dir,
)
from tests.test_instag import tagger


def responder(body: dict):
    return tagger(body) if "User query: " in request_text(body) else pipeline_responder(body)


@pytest.mark.slow
@pytest.mark.e2e  # a whole curate run with a sharded fine-tune
def test_curate_with_fsdp_on_two_cpu_workers_and_instag_shows_the_sharding(
        prefect_api, ray_local, tiny_model_dir: Path, tmp_path: Path) -> None:
    from gleaner.flows.cli import app
    from gleaner.tasks.train.finetune import count_parameters

    sample = write_sample(tmp_path / "sample.json", 20)
    with OpenAIStub(responder) as stub:
        path = write_config(tmp_path / "config.yaml", str(tmp_path / "store"), stub.base_url)
        document = yaml.safe_load(path.read_text())
        document["curate"].update(train=True, downstream="subflow", signals=["tag"])
        document["tag"] = {"endpoint": {"base_url": stub.base_url, "model": "stub-model"}}
        document["finetune"] = {
            "base_model": str(tiny_model_dir), "strategy": "fsdp", "num_workers": 2,
            "baseline": "none", "overrides": {"max_steps": 2, "effective_batch_size": 4,
                                              "per_device_batch_size": 2, "max_length": 64}}
        path.write_text(yaml.safe_dump(document))
        result = CliRunner().invoke(app, ["curate", str(sample), "--config", str(path),
                                          "--run-id", "sharded", "--no-eval", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["tag"]["ok"] + summary["tag"]["failed"] == summary["tag"]["examples"] == 20
    assert summary["tag"]["distinct_tags"] > 1
    trained = summary["finetune"]["curated"]
    assert (trained["strategy"], trained["world_size"]) == ("fsdp", 2)
    whole = count_parameters(str(tiny_model_dir))
    assert all(abs(n - whole / 2) < 0.1 * whole for n in trained["rank_parameters"])
