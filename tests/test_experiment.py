"""The experiment grid: arms in short form, shared selections, the budget guard, and the whole
grid through the CLI on the offline default with tiny settings, killed after its first judged
arm and resumed (nothing finished is trained or judged again: the store and the loopback
judge's request count say so)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support.openai_server import OpenAIStub, Reply
from tests.support.pipeline import ROOT, prefect_env
from tests.support.tiny_models import (  # noqa: F401  (fixtures, by their names)
    fixture_smol_tokenizer_dir,
    fixture_tiny_model_dir,
)

ANSWER_RE = re.compile(r"\[The Start of Assistant ([12])'s Answer\]\n(.*?)\n\n\[The End", re.S)


REJECT = {"next_probe": False}  # the next pairwise probe is answered 401 (a rejected key)


def judge(body: dict) -> Reply:
    """AlpaGasus' pairwise format (the longer answer scores higher) and FastChat's grades."""
    user = body["messages"][-1]["content"]
    if user.startswith("[Question]\nSay OK.") and REJECT["next_probe"]:
        REJECT["next_probe"] = False
        return Reply(status=401, error_message="Incorrect API key provided")
    if "[[rating]]" in user or "[[rating]]" in body["messages"][0]["content"]:
        return Reply(f"Fine.\nRating: [[{1 + len(user) % 10}]]")
    answers = dict(ANSWER_RE.findall(user))
    if len(answers) != 2:
        return Reply("5 5\nProbe.")  # the grading stage's probe ("Say OK.")
    l1, l2 = len(answers["1"]), len(answers["2"])
    return Reply(f"{6 + (l1 > l2)} {6 + (l2 > l1)}\nLength decides.")


def pool_file(shared_data: Path, path: Path, rows: int) -> Path:
    records = json.loads((shared_data / "alpaca" / "alpaca_random_9k.json").read_text())[:rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def grid_config(tmp_path: Path, shared_data: Path, tiny_model_dir: Path, judge_url: str,
                arms: list, **experiment) -> dict:
    return {
        "store": {"url": str(tmp_path / "store")},
        "ray": {"num_cpus": 2},
        "ifd": {"model": str(tiny_model_dir), "max_length": 128},
        "length": {"tokenizer": str(tiny_model_dir)},
        "finetune": {"base_model": str(tiny_model_dir), "overrides": {
            "max_steps": 2, "effective_batch_size": 4, "per_device_batch_size": 2,
            "max_length": 128, "learning_rate": 5e-3, "checkpoint_every_steps": 1}},
        "evaluate": {"endpoint": {"base_url": judge_url, "model": "gpt-4"},
                     "test_sets": ["vicuna"], "limit": 3,
                     "generation": {"forward_batch_size": 3, "max_tokens": 8},
                     "test_sets_dir": str(shared_data / "eval_sets")},
        "mt_bench": {"question_ids": [81, 101], "answers": {"max_tokens": 6}},
        "experiment": {"name": "tiny", "arms": arms, **experiment},
    }


def write_yaml(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    return path


def test_short_forms_names_and_shared_selections() -> None:
    from gleaner.config import GleanerConfig
    from gleaner.tasks.experiment.arms import plan_selections
    from gleaner.tasks.experiment.pool import needed_stages

    config = GleanerConfig.model_validate({"experiment": {"arms": [
        "full", "random@9k", "alpagasus@τ4.5", "deita@6k", "ifd@5%", "longest@1k",
        {"name": "random-again", "selector": "random", "size": 9000},
        {"name": "same-size", "selector": "random", "size_of": "alpagasus-t4_5"}],
        "baseline": "full"}})
    arms = {a.name: a for a in config.experiment.arms}
    assert (arms["random-9k"].size, arms["ifd-5pct"].fraction) == (9000, 0.05)
    assert (arms["alpagasus-t4_5"].selector, arms["alpagasus-t4_5"].threshold) == (
        "threshold", 4.5)
    selections = plan_selections(config, "pool-run")
    by_name = {s.name: s for s in selections}
    assert by_name["random-9k"].arms == ["random-9k", "random-again"]  # one selection, one model
    assert by_name["full"].baseline and not by_name["random-9k"].baseline
    assert [s.name for s in selections].index("same-size") > [
        s.name for s in selections].index("alpagasus-t4_5")
    assert needed_stages(selections) == ["rate", "score", "embed", "ifd", "length"]
    other_recipe = config.with_overrides({"finetune.overrides": {"learning_rate": 1e-4}})
    again = {s.name: s for s in plan_selections(other_recipe, "pool-run")}
    assert again["deita-6k"].dataset == by_name["deita-6k"].dataset  # the same selection...
    assert again["deita-6k"].model != by_name["deita-6k"].model  # ...another model
    for bad, message in ((["full"] * 2, "must differ"), (["deita"], "keeps a budget"),
                         (["x@q", "full"], "after '@'")):
        with pytest.raises(ValueError, match=message):
            GleanerConfig.model_validate({"experiment": {"arms": bad}})


def test_arms_naming_the_same_selection_share_one_dataset_version(shared_data: Path,
                                                                  tmp_path: Path) -> None:
    import pyarrow as pa

    from gleaner import layout
    from gleaner.config import GleanerConfig
    from gleaner.schema import EXAMPLE_SCHEMA, Example
    from gleaner.store import Store
    from gleaner.tasks.experiment.arms import plan_selections
    from gleaner.tasks.experiment.selection import select_all
    from gleaner.tasks.publish.versions import list_versions

    rows = json.loads((shared_data / "alpaca" / "alpaca_random_9k.json").read_text())[:40]
    store = Store(str(tmp_path / "store"))
    table = pa.Table.from_pylist([Example("alpaca", i, r["instruction"], r["input"], r["output"])
                                  .to_row() for i, r in enumerate(rows)], EXAMPLE_SCHEMA)
    store.write_part("pool", layout.INGEST, 0, table)
    config = GleanerConfig.model_validate({"store": {"url": str(tmp_path / "store")},
                                           "experiment": {"name": "share", "pool": {
                                               "run_id": "pool"}, "arms": [
        "full", "random@10", {"name": "random-ten", "selector": "random", "size": 10},
        {"name": "same-as-full", "selector": "random", "size_of": "random-10", "seed": 3}]}})
    selections = plan_selections(config, "pool")
    for _ in range(2):  # a rerun publishes nothing new
        chosen = select_all.fn("exp", config, selections)
    assert sorted(chosen) == ["full", "random-10", "same-as-full"]
    assert chosen["random-10"]["arms"] == ["random-10", "random-ten"]
    assert chosen["full"]["examples"] == 40 and chosen["random-10"]["examples"] == 10
    assert chosen["same-as-full"]["examples"] == 10  # as many as random-10 kept
    for name, picked in chosen.items():
        versions = list_versions(store, picked["dataset"]["name"])
        assert [v["version"] for v in versions] == [1], name
        manifest = store.read_stage("exp", picked["manifest_stage"])
        assert manifest.num_rows == 40 and sum(manifest.column("selected").to_pylist()) == \
            versions[0]["counts"]["examples"]
    assert len({c["dataset"]["name"] for c in chosen.values()}) == 3


def test_budget_guard_refuses_before_spending(prefect_api, ray_local, shared_data: Path,
                                              tiny_model_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gleaner.flows.cli import app

    pool = pool_file(shared_data, tmp_path / "pool.jsonl", 12)
    with OpenAIStub(judge) as stub:
        document = grid_config(tmp_path, shared_data, tiny_model_dir, stub.base_url,
                               ["random@4", "longest@4"], max_usd=0.0001, max_finetunes=1,
                               mt_bench=True)
        document["experiment"]["pool"] = {"sources": [str(pool)]}
        path = write_yaml(tmp_path / "grid.yaml", document)
        runner = CliRunner()
        planned = runner.invoke(app, ["experiment", "--config", str(path), "--plan", "--json"])
        assert planned.exit_code == 0, planned.output
        plan = json.loads(planned.stdout.strip().splitlines()[-1])
        # 2 models to train, 3 vicuna answers + 2 x 2 MT-Bench turns each, both orders of 3
        # pairs + 2 x 2 MT-Bench grades per model
        assert plan["counts"] == {"finetunes": 2, "generations": 2 * (3 + 4),
                                  "judge_calls": 2 * 3 + 2 * 4}
        assert plan["over_budget"] and plan["over_finetunes"] and plan["total_usd"] > 0.0001
        assert not (tmp_path / "store" / "runs").exists()  # --plan writes nothing
        refused = runner.invoke(app, ["experiment", "--config", str(path)])
        assert refused.exit_code == 2 and "--yes" in refused.output
        assert "over the limit" in refused.output and "experiment.max_finetunes" in refused.output
        assert stub.count() == 0  # nothing was sent
        assert all(f["memory"]["fits"] and f["memory"]["effective_batch"] == 4
                   for f in plan["finetunes"])
        document["finetune"]["overrides"]["per_device_batch_size"] = 3  # 4 = 3 x ? : no
        unfit = write_yaml(tmp_path / "unfit.yaml", document)
        refused = runner.invoke(app, ["experiment", "--config", str(unfit), "--yes"])
        assert refused.exit_code == 2, refused.output  # --yes does not make a run fit
        assert "effective batch 4 is not micro-batch 3" in refused.output
        assert stub.count() == 0
    store = tmp_path / "store" / "runs" / "experiment-tiny"
    assert (store / "ingest").is_dir() and not (store / "finetune").exists()
    saved = json.loads((store / "experiment" / "tiny" / "plan.json").read_text())
    assert saved["counts"] == plan["counts"]


def wait_for(path: Path, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the grid exited ({process.returncode}) before {path.name}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout_s:.0f}s")
        time.sleep(0.2)


def flow_runs(names: list[str]) -> list:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    async def read() -> list:
        async with get_client() as client:
            return await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)))

    return asyncio.run(read())


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_grid_end_to_end_killed_after_an_arm_and_resumed(prefect_api, shared_data: Path,
                                                         tiny_model_dir: Path, tmp_path: Path):
    from gleaner import layout
    from gleaner.store import Store

    pool = pool_file(shared_data, tmp_path / "pool.jsonl", 30)
    arms = ["random-8", "longest-8", "ifd-25pct"]  # the names of random@8, longest@8, ifd@25%
    with OpenAIStub(judge) as stub:
        document = grid_config(tmp_path, shared_data, tiny_model_dir, stub.base_url,
                               ["random@8", "longest@8", "ifd@25%"], mt_bench=True)
        document["experiment"]["pool"] = {"sources": [str(pool)]}
        path = write_yaml(tmp_path / "grid.yaml", document)
        command = [sys.executable, "-m", "gleaner.flows.cli", "experiment", "--config",
                   str(path), "--json", "--yes"]
        env = prefect_env(prefect_api)
        run = tmp_path / "store" / "runs" / "experiment-tiny"
        first_arm = run / "experiment" / "tiny" / "arms" / "longest-8.json"
        with open(tmp_path / "first.out", "w") as out, open(tmp_path / "first.err", "w") as err:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                wait_for(first_arm, process, 1200)
            finally:
                os.killpg(process.pid, signal.SIGKILL)  # the grid and everything it started
                process.wait(timeout=60)
        asked_first = stub.count()
        assert not (run / "experiment" / "tiny" / "arms" / "ifd-25pct.json").exists()
        finished = {name: mtimes(run / "finetune" / name) for name in
                    (p.name for p in (run / "finetune").iterdir())}
        stderr = (tmp_path / "first.err").read_text()
        assert "3 fine-tune(s) to train" in stderr  # the plan, printed before spending

        # the rerun's first judge probe (the unfinished arm's) meets a rejected key: a fatal
        # error for that stage; the arm's subflow is retried alone and then succeeds
        REJECT["next_probe"] = True
        again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=1500, stdin=subprocess.DEVNULL)
        assert again.returncode == 0, again.stderr[-3000:]
        asked_again = stub.count() - asked_first
        assert not REJECT["next_probe"]
    assert "1 fine-tune(s) to train" in again.stderr  # two models were in the store
    result = json.loads(again.stdout.strip().splitlines()[-1])
    store = Store(str(tmp_path / "store"))
    by_arm = {a["arm"]: a for a in result["arms"]}
    assert list(by_arm) == arms and result["failed_arms"] == []
    baseline, longest, ifd = (by_arm[a] for a in arms)
    assert baseline["baseline"] and not longest["baseline"]

    # every arm: a model, answers, MT-Bench; every judged arm: W/T/L that add up to 3 prompts
    for arm in by_arm.values():
        assert (run / "finetune" / arm["model"] / "model" / "config.json").exists()
        assert (Path(layout.answers_path(store, "experiment-tiny", arm["model"], "vicuna"))
                .exists())
        assert arm["mt_bench"]["graded"] + arm["mt_bench"]["failed"] == 4
        assert arm["dataset"]["version"] == 1 and arm["finetune"]["train_tokens"] > 0
    for arm in (longest, ifd):
        part = arm["evaluation"]["test_sets"]["vicuna"]
        assert part["win"] + part["tie"] + part["lose"] + part["failed"] == 3
        assert part["winning_score"] == pytest.approx(  # the report rounds to 4 places
            (part["win"] - part["lose"]) / 3 + 1, abs=1e-4)
        assert arm["bias"]["vicuna"]["pairs_both_orders"] == 3 - part["failed"]
    assert baseline.get("evaluation") is None and baseline["examples"] == 8
    assert longest["examples"] == 8 and ifd["examples"] <= round(0.25 * 30)

    # the rerun: the two finished arms were reused whole (neither trained nor judged again)
    assert baseline["reused"] and longest["reused"] and not ifd["reused"]
    trained_first = {name for name, files in finished.items() if "summary.json" in files}
    assert trained_first == {baseline["model"], longest["model"]}
    # the unfinished arm was trained by the rerun's first attempt; its retry reused that model
    assert ifd["finetune"]["reused"] and (run / "finetune" / ifd["model"] / "summary.json"
                                           ).exists()
    for name, files in finished.items():
        if name in (baseline["model"], longest["model"]):
            assert mtimes(run / "finetune" / name) == files, name
    spent = [store.read_json(layout.summary_path(store, "experiment-tiny", stage))["requests"]
             for stage in (layout.judge_stage(ifd["evaluation"]["comparison"], "vicuna"),
                           layout.mt_bench_grades_stage(ifd["model"]))]
    # only the unfinished arm's judging was sent (and the one rejected probe)
    assert asked_again == sum(spent) + 1 and sum(spent) > 0
    runs = flow_runs(["arm-ifd-25pct-experiment-tiny", "arm-longest-8-experiment-tiny"])
    retried = [r for r in runs if r.name.startswith("arm-ifd") and r.state.is_completed()]
    assert [r.run_count for r in retried] == [2]  # the failed arm's subflow, run again alone
    assert all(r.run_count == 1 for r in runs if r.name.startswith("arm-longest"))

    # the table, the plot and the artifacts' source in the store
    text = (run / "experiment" / "tiny" / "table.md").read_text()
    assert "| longest-8 | longest | 8 |" in text and "| random-8 | random | 8 |" in text
    assert f"{longest['evaluation']['test_sets']['vicuna']['win']}/" in text
    assert (run / "experiment" / "tiny" / "winning_score.png").read_bytes()[:4] == b"\x89PNG"
    table = json.loads((run / "experiment" / "tiny" / "table.json").read_text())
    assert [a["arm"] for a in table["arms"]] == arms


def test_guard_refuses_a_limit_it_cannot_price() -> None:
    from gleaner.tasks.experiment.budget import OverBudget, check_guard

    plan = {"experiment": "tiny", "limit_usd": 5.0, "total_usd": 0.0, "over_budget": False,
            "over_finetunes": False, "unpriced_spend": ["my-judge"],
            "counts": {"finetunes": 1}, "max_finetunes": None}
    with pytest.raises(OverBudget, match="no price is known for my-judge"):
        check_guard(plan, approved=False)
    check_guard(plan, approved=True)  # a person said yes
    check_guard({**plan, "limit_usd": None}, approved=False)  # no limit: nothing to hold to


@pytest.mark.slow
@pytest.mark.e2e  # a real compare run's pairs, then a grid whose second arm is DPO on them
def test_a_dpo_arm_trains_on_a_compare_runs_pairs_from_its_twins_fine_tune(
        prefect_api, ray_local, shared_data: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gleaner.flows.cli import app
    from gleaner.schema import Example, examples_to_table
    from gleaner.store import Store

    store = Store(str(tmp_path / "store"))
    records = json.loads((shared_data / "alpaca" / "alpaca_random_9k.json").read_text())[:12]
    pool = examples_to_table([Example("alpaca", i, r["instruction"], r["input"], r["output"])
                              for i, r in enumerate(records)])
    store.write_part("pool", "ingest", 0, pool)
    others = tmp_path / "short.jsonl"  # a second, terse response to every prompt
    others.write_text("".join(json.dumps({"id": row["id"], "prompt": row["instruction"],
                                          "answer": row["output"].split()[0]}) + "\n"
                              for row in pool.to_pylist()))
    runner = CliRunner()
    with OpenAIStub(judge) as stub:
        compared = runner.invoke(app, [
            "compare", "--run-id", "pool", "--store", store.url, "--responses", "original",
            "--responses", str(others), "--judge-base-url", stub.base_url, "--judge-model",
            "gpt-4", "--json"])
        assert compared.exit_code == 0, compared.output
        pairs = json.loads(compared.stdout.strip().splitlines()[-1])["pairs"]
        assert pairs >= 4  # ratings differ on most prompts: pairs to learn from
        document = grid_config(tmp_path, shared_data, tiny_model_dir, stub.base_url,
                               ["random@8", "random@8+dpo"])
        document["experiment"]["pool"] = {"run_id": "pool"}
        document["dpo"] = {"beta": 0.5, "heldout_fraction": 0.2, "overrides": {
            "max_steps": 2, "effective_batch_size": 4, "per_device_batch_size": 4,
            "max_length": 128, "learning_rate": 5e-3}}
        path = write_yaml(tmp_path / "grid.yaml", document)
        ran = runner.invoke(app, ["experiment", "--config", str(path), "--json", "--yes"])
        assert ran.exit_code == 0, ran.output
    assert "2 fine-tune(s) to train" in ran.output  # the shared fine-tune once, then DPO
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    sft, dpo = (next(a for a in result["arms"] if a["arm"] == name)
                for name in ("random-8", "random-8-dpo"))
    assert f"/finetune/{sft['model']}/" in dpo["finetune"]["model"]  # its twin's fine-tune...
    assert dpo["finetune"]["reused"] and not sft["finetune"]["reused"]  # ...trained once
    assert dpo["model"] != sft["model"] and f"/finetune/{dpo['model']}/" in dpo["dpo"]["model"]
    assert dpo["dpo"]["start"] == f"run `experiment-tiny`'s `{sft['model']}` model"
    assert dpo["dpo"]["pairs_run"] == "pool" and dpo["dpo"]["beta"] == 0.5
    assert 0 < dpo["dpo"]["pairs"] < pairs and dpo["dpo"]["steps"] == 2  # some held out
    part = dpo["evaluation"]["test_sets"]["vicuna"]  # judged against the SFT baseline
    assert part["win"] + part["tie"] + part["lose"] + part["failed"] == 3
    assert dpo["evaluation"]["comparison"] == f"{dpo['model']}-vs-{sft['model']}"
    text = (tmp_path / "store" / "runs" / "experiment-tiny" / "experiment" / "tiny" /
            "table.md").read_text()
    assert "| random-8-dpo | random + DPO | 8 |" in text


def test_the_grid_asks_selectors_for_traits_not_names() -> None:
    """A plugin selector with DEITA's traits gets @τ as its tau and a tau in its settings,
    with no name checked anywhere; size_of is refused where the selector cannot take it."""
    from gleaner.config import GleanerConfig
    from gleaner.registry import register, registry
    from gleaner.tasks.experiment.arms import plan_selections
    from gleaner.tasks.select.selectors import Selector, selector

    if "spread" not in registry("selector"):
        register("selector", "spread")(Selector(selector("deita").run, "evol",
                                                needs_vectors=True, uses_tau=True))
    config = GleanerConfig.model_validate({"experiment": {"arms": [
        "full", {"name": "spread-6", "selector": "spread", "size": 6, "tau": 0.5}]}})
    spread = next(s for s in plan_selections(config, "pool") if s.name == "spread-6")
    assert spread.settings["tau"] == 0.5 and "seed" not in spread.settings
    from gleaner.arm_spec import parse_arm

    assert parse_arm("spread@τ0.7") == {"name": "spread-t0_7", "selector": "spread",
                                        "tau": 0.7}
    assert parse_arm("alpagasus@τ4.5")["threshold"] == 4.5  # a threshold for the others
    with pytest.raises(ValueError, match="cannot keep as many as another arm"):
        GleanerConfig.model_validate({"experiment": {"arms": [
            "random@4", {"name": "d", "selector": "deita", "size_of": "random-4"}]}})


def test_a_dpo_arm_shares_its_twins_fine_tune_whatever_the_twins_name() -> None:
    from gleaner.config import GleanerConfig
    from gleaner.tasks.experiment.arms import plan_selections

    config = GleanerConfig.model_validate({"experiment": {"arms": [
        "random@8+dpo", {"name": "mine", "selector": "random", "size": 8}]}})
    dpo, twin = plan_selections(config, "pool")
    assert dpo.dpo and not twin.dpo and dpo.key != twin.key
    assert dpo.sft_model == twin.sft_model == twin.model != dpo.model  # trained once
