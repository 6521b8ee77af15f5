"""The cost plan before anything is spent: a refresh that changed 5 % of a pool plans 5 % of
the requests, with prompt and completion tokens within 10 % of what a loopback server that
reports usage (counted with a real tokenizer) then records; the run's finished parts are not
planned again; `gleaner plan --json`, `curate --dry-run` and the budget gate as the CLI runs
them. Real Alpaca data, real Prefect and Ray for the runs, real HTTP on loopback."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import traceback
from pathlib import Path

import pytest
import yaml

from gleaner.config import GleanerConfig
from gleaner.store import Store
from gleaner.tasks.cost.plan import plan_sources
from gleaner.tasks.cost.report import OverBudget, actual_cost, check_budget, keep_plan, plan_text
from tests.support.openai_server import OpenAIStub, Reply, request_text


@functools.lru_cache(maxsize=1)
def wordpiece():  # a real tokenizer the server counts with (not characters / 4)
    from transformers import AutoTokenizer

    from gleaner.models import minilm_dir

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def counting_rater(body: dict) -> Reply:
    """Answers like a rater and reports usage the way a provider does: its own token counts."""
    text = request_text(body)
    h = int(hashlib.sha256(text.encode()).hexdigest(), 16)
    answer = f"{h % 11 / 2:g}\nThe answer follows the instruction and the input; " + (
        "it is accurate, clear and complete." if h % 2 else "a few details could be better.")
    messages = body.get("messages", [])
    prompt = sum(len(wordpiece().encode(m["content"], add_special_tokens=False))
                 for m in messages) + 3 * len(messages) + 3
    return Reply(answer, prompt_tokens=prompt,
                 completion_tokens=len(wordpiece().encode(answer, add_special_tokens=False)))


def write_pool(shared_data: Path, path: Path, changed: int = 0) -> Path:
    rows = json.loads((shared_data / "alpaca" / "alpaca_random_9k.json").read_text())[:400]
    for row in rows[:changed]:  # a refresh: these examples were edited upstream
        row["output"] = row["output"] + " (Revised.)"
    path.write_text(json.dumps(rows))
    return path


def fresh_tokens(store: Store, run_id: str) -> tuple[int, int, int]:
    rows = [r for r in store.read_stage(run_id, "rate").to_pylist() if not r["cached"]]
    return (len(rows), sum(r["prompt_tokens"] for r in rows),
            sum(r["completion_tokens"] for r in rows))


def test_a_refresh_that_changed_5_percent_plans_5_percent_within_10_percent_of_the_tokens(
        prefect_api, ray_local, shared_data: Path, tmp_path: Path) -> None:
    from gleaner.flows.rate_flow import run_rate
    from gleaner.tasks.ingest.ingest import run_ingest

    store = Store(str(tmp_path / "store"))
    first_pool = write_pool(shared_data, tmp_path / "week1.json")
    refreshed = write_pool(shared_data, tmp_path / "week2.json", changed=20)
    with OpenAIStub(counting_rater) as stub:
        config = GleanerConfig().with_overrides({
            "store.url": store.url, "rate.endpoint.base_url": stub.base_url,
            "rate.endpoint.model": "gpt-4o-mini", "rate.mode": "explain",
            "rate.resources.batch_size": 100, "rate.resources.concurrency": 32,
            "curate.train": False, "curate.evaluate": False})
        first = plan_sources([str(first_pool)], config, "week1")
        [rate] = first["stages"]
        assert rate["requests"] == rate["to_do"] == rate["rows"] == first["examples"] > 390
        assert rate["completion_bound"] and "default" in rate["counter"]  # nothing recorded
        run_ingest([str(first_pool)], store, "week1", config)
        run_rate(config, "week1")

        plan = plan_sources([str(refreshed)], config, "week2")
        [rate] = plan["stages"]
        assert (rate["requests"], rate["cached"]) == (20, first["examples"] - 20)  # the 5 %
        assert not rate["completion_bound"] and "calibrated on" in rate["counter"]
        assert rate["batch_usd"] == pytest.approx(rate["sync_usd"] / 2, rel=0.01)
        run_ingest([str(refreshed)], store, "week2", config)
        summary = run_rate(config, "week2")
    made, prompt, completion = fresh_tokens(store, "week2")
    assert made == 20 and summary["cached"] == first["examples"] - 20
    assert rate["prompt_tokens"] == pytest.approx(prompt, rel=0.10)
    assert rate["completion_tokens"] == pytest.approx(completion, rel=0.10)
    # the uncalibrated first plan was off by more: what calibration is for
    _, prompt_1, _ = fresh_tokens(store, "week1")
    assert abs(first["stages"][0]["prompt_tokens"] - prompt_1) / prompt_1 > 0.10

    # the run's finished parts are not planned again (cache off: only parts count)
    store.fs.rm(store.part_paths(store.stage_path("week1", "rate"))[2])
    no_cache = config.with_overrides({"rate.cache": False})
    again = plan_sources([str(first_pool)], no_cache, "week1")["stages"][0]
    assert (again["requests"], again["finished"]) == (100, first["examples"] - 100)

    # kept with the run, and the actual spend next to it once it ran
    keep_plan(store, "week2", plan)
    assert store.read_json(f"{store.run_path('week2')}/cost_plan.json")["stages"][0][
        "requests"] == 20
    cost = actual_cost(store, "week2", plan)["stages"]["rate"]
    assert cost["planned_requests"] == 20 and cost["requests"] == 20 + 1  # and the probe
    assert "rate" in plan_text(plan) and "calibrated" in plan_text(plan)


def test_the_budget_gate_names_the_total_and_the_limit() -> None:
    plan = {"run_id": "r", "total_usd": 12.5, "max_usd": 10.0, "over_budget": True}
    with pytest.raises(OverBudget, match=r"\$12.5000, more than budget.max_usd = \$10.0000"):
        check_budget(plan)
    check_budget(plan, approved=True)
    check_budget({**plan, "over_budget": False})


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The `gleaner` command, run in this process (Typer's runner: the same app, arguments,
    exit code, stdout and stderr, without a new interpreter importing it all again)."""
    from typer.testing import CliRunner

    from gleaner.flows.cli import app

    result = CliRunner().invoke(app, list(args))
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)


def test_plan_json_dry_run_and_a_refused_curate_send_nothing(shared_data: Path,
                                                             tmp_path: Path) -> None:
    pool = write_pool(shared_data, tmp_path / "pool.json")
    store = tmp_path / "store"
    settings = {
        "store": {"url": str(store)},
        "rate": {"endpoint": {"base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o-mini"}},
        "evaluate": {"endpoint": {"base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o",
                               "api": "batch"},
                     "test_sets": ["vicuna"], "test_sets_dir": str(shared_data / "eval_sets")},
        "budget": {"max_usd": 0.01}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings))
    planned = _cli("plan", str(pool), "--config", str(config), "--json")
    assert planned.returncode == 0, planned.stderr[-2000:]
    plan = json.loads(planned.stdout)
    stages = {s["stage"]: s for s in plan["stages"]}
    assert stages["rate"]["requests"] == plan["examples"] > 390
    judge = stages["evaluate/curated-vs-baseline/judge/vicuna"]
    assert (judge["requests"], judge["api"]) == (160, "batch")  # both orders of 80 prompts
    assert plan["total_usd"] == pytest.approx(stages["rate"]["sync_usd"] + judge["batch_usd"])
    assert {f["arm"] for f in plan["finetunes"]} == {"curated", "baseline"}
    assert all(f["tokens"] > 0 for f in plan["finetunes"]) and plan["over_budget"]

    dry = _cli("curate", str(pool), "--config", str(config), "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "cost plan of run" in dry.stdout and "OVER budget.max_usd" in dry.stdout
    refused = _cli("curate", str(pool), "--config", str(config))
    assert refused.returncode == 2
    assert "more than budget.max_usd = $0.0100" in refused.stderr and "--yes" in refused.stderr
    assert not (store / "runs").exists()  # nothing ingested, nothing rated, nothing sent
