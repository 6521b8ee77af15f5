"""A finished `gleaner curate` run, run again with the same command, does nothing: every step
(ingest, rate, score, embed, select, publish, the fine-tunes, answers, the judge) says it was
reused, no request reaches the LLM server, no part, model or dataset file is written again,
and no new dataset version appears. Every LLM call goes to a loopback OpenAI server; the
model is a tiny config-built Llama."""

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
from tests.test_experiment import judge

# What a rerun may rewrite: the run's record and the engine's own bookkeeping.
BOOKKEEPING = ("run.json", "_summary.json", "_plan.json", "cost_plan.json")


def responder(body: dict):
    text = request_text(body)
    return judge(body) if "[The Start of Assistant" in text or "Say OK." in text \
        else pipeline_responder(body)


def written(store: Path) -> dict[str, int]:
    """Every file of the store but the bookkeeping, with its modification time."""
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in store.rglob("*")
            if p.is_file() and p.name not in BOOKKEEPING and "/_lease" not in str(p)}


@pytest.mark.slow
@pytest.mark.e2e  # a whole curate run with its fine-tunes and evaluation, twice
def test_a_finished_curate_run_reruns_as_a_no_op_over_every_step(
        prefect_api, ray_local, tiny_model_dir: Path, shared_data: Path,
        tmp_path: Path) -> None:
    from gleaner.flows.cli import app

    sample = write_sample(tmp_path / "sample.json", 16)
    store = tmp_path / "store"
    with OpenAIStub(responder) as stub:
        path = write_config(tmp_path / "config.yaml", str(store), stub.base_url, budget=6)
        document = yaml.safe_load(path.read_text())
        document["curate"].update(train=True, evaluate=True, downstream="subflow")
        document["finetune"] = {
            "base_model": str(tiny_model_dir), "baseline": "random",
            "overrides": {"max_steps": 1, "effective_batch_size": 2,
                          "per_device_batch_size": 2, "max_length": 64}}
        document["evaluate"] = {
            "endpoint": {"base_url": stub.base_url, "model": "gpt-4"}, "test_sets": ["vicuna"],
            "limit": 2, "generation": {"max_tokens": 4},
            "test_sets_dir": str(shared_data / "eval_sets")}
        path.write_text(yaml.safe_dump(document))
        command = ["curate", str(sample), "--config", str(path), "--run-id", "again",
                   "--json"]

        first = CliRunner().invoke(app, command)
        assert first.exit_code == 0, first.output
        made = json.loads(first.stdout.strip().splitlines()[-1])
        sent, before = len(stub.requests), written(store)
        assert sent > 0 and made["finetune"]["curated"]["reused"] is False

        second = CliRunner().invoke(app, command)
        assert second.exit_code == 0, second.output
        again = json.loads(second.stdout.strip().splitlines()[-1])
        assert len(stub.requests) == sent, "a finished run sent requests again"

    assert written(store) == before, "a finished run wrote parts, models or datasets again"
    assert again["ingest"]["reused"] and again["select"]["reused"]
    assert again["dataset"]["version"] == made["dataset"]["version"]
    assert all(m["reused"] for m in again["finetune"].values())
    for stage in ("rate", "score", "embed"):  # engine stages: every part resumed
        assert again[stage]["batches_resumed"] == again[stage]["batches"] > 0, stage
    verdicts = again["evaluate"]
    assert verdicts["reused"] and verdicts["overall"] == made["evaluate"]["overall"]
