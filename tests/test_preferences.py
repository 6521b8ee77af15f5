"""Preference data out: a run's comparison pairs and an evaluation's verdicts published as a
dataset version in TRL's columns, exported through the export registry (JSONL, Parquet, HF
save_to_disk), and read back as the pairs DPO trains on."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from gleaner import layout
from gleaner.store import Store
from gleaner.tasks.compare.pairs import PAIRS_SCHEMA
from gleaner.tasks.evaluate.stage import JUDGEMENT_SCHEMA
from gleaner.tasks.publish.preferences import verdict_pairs, version_pairs
from tests.test_reward import synthetic_pairs

TRL_COLUMNS = ["prompt", "chosen", "rejected"]


def judged(outcomes: list[tuple[str, str]]) -> pa.Table:
    """One judged prompt per (A-first outcome, B-first outcome), A's answers longer."""
    scores = {"win": (8.0, 4.0), "lose": (4.0, 8.0), "tie": (6.0, 6.0)}
    rows = []
    for i, (first, second) in enumerate(outcomes):
        a1, b1 = scores[first]
        a2, b2 = scores[second]  # B is Assistant 1 in the second order
        rows.append({"id": f"j{i}", "test_set": "koala", "key": str(i), "question": f"Q{i}?",
                     "answer_a": f"long answer {i}", "answer_b": f"short {i}",
                     "a_first_score_1": a1, "a_first_score_2": b1, "b_first_score_1": b2,
                     "b_first_score_2": a2, "outcome_a_first": first, "outcome_b_first": second,
                     "review_a_first": "", "review_b_first": "", "judge_model": "gpt-4",
                     "status": "ok", "cached": False, "attempts": 2, "prompt_tokens": 0,
                     "completion_tokens": 0, "latency_ms": 0.0})
    rows.append({**rows[0], "id": "failed", "status": "failed", "key": "x"})
    return pa.Table.from_pylist(rows, schema=JUDGEMENT_SCHEMA)


def test_verdicts_become_pairs_by_the_evaluations_rule() -> None:
    table = judged([("win", "win"), ("win", "tie"), ("lose", "lose"), ("win", "lose"),
                    ("tie", "tie")])
    pairs = verdict_pairs(table, "alpagasus")
    # a win and a tie is a win under AlpaGasus' rule; win+lose and tie+tie make no pair
    assert [p["prompt_id"] for p in pairs] == ["koala:0", "koala:1", "koala:2"]
    assert [p["chosen"] for p in pairs] == ["long answer 0", "long answer 1", "short 2"]
    assert pairs[0]["margin"] == pytest.approx(4.0) and pairs[1]["margin"] == pytest.approx(2.0)
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    fastchat = verdict_pairs(table, "fastchat")  # the orders must agree
    assert [p["prompt_id"] for p in fastchat] == ["koala:0", "koala:2"]


def test_compare_pairs_publish_export_and_read_back_as_training_pairs(
        prefect_api, tmp_path: Path) -> None:
    from datasets import load_from_disk

    from gleaner.flows.cli import app

    store = Store(str(tmp_path / "store"))
    pairs = synthetic_pairs(6)
    store.write_part("run", layout.COMPARE_PAIRS, 0, pa.Table.from_pylist(pairs,
                                                                          schema=PAIRS_SCHEMA))
    runner = CliRunner()
    out = tmp_path / "prefs.jsonl"
    result = runner.invoke(app, ["preferences", "--run-id", "run", "--store", store.url,
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["dataset"]["name"] == "curated-preferences"
    assert summary["dataset"]["counts"]["examples"] == summary["export"]["rows"] == 6
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["chosen"] for r in rows] == [p["chosen"] for p in pairs]
    assert all(set(TRL_COLUMNS) <= set(r) and r["margin"] == 5.0 and r["source"] == "compare:run"
               for r in rows)
    assert rows[0]["prompt"] == pairs[0]["instruction"]

    for fmt, target in (("parquet", tmp_path / "p.parquet"), ("hf", tmp_path / "hf")):
        again = runner.invoke(app, ["preferences", "--run-id", "run", "--store", store.url,
                                    "--name", f"p-{fmt}", "--out", str(target), "--format", fmt])
        assert again.exit_code == 0, again.output
    assert pq.read_table(tmp_path / "p.parquet").column("rejected").to_pylist() == [
        p["rejected"] for p in pairs]
    loaded = load_from_disk(str(tmp_path / "hf"))
    assert set(TRL_COLUMNS) <= set(loaded.column_names) and loaded.num_rows == 6

    back = version_pairs(store, "curated-preferences@1")  # what `dpo train --preferences` reads
    assert back.schema == PAIRS_SCHEMA
    assert back.select(["prompt_id", "chosen", "rejected"]).to_pylist() == [
        {k: p[k] for k in ("prompt_id", "chosen", "rejected")} for p in pairs]

    refused = runner.invoke(app, ["preferences", "--run-id", "run", "--store", store.url,
                                  "--from", "verdicts"])
    assert refused.exit_code == 2 and "run gleaner evaluate first" in refused.output
    with pytest.raises(ValueError, match="not a preference version"):
        store.write_part("ex", "curated", 0, pa.table({"id": ["a"], "instruction": ["x"]}))
        from gleaner.tasks.publish.versions import publish_dataset_version

        publish_dataset_version(store, "plain", "ex", store.read_stage("ex", "curated"))
        version_pairs(store, "plain")
