"""InsTag: tags parsed and normalised, complexity-first diverse selection checked against a
reference written here from the paper's description on 200 rows, and the whole path on a
loopback OpenAI server: ``gleaner tag`` (failures are rows), ``gleaner select --selector
instag``, the plan and the grid seeing the stage."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from gleaner.engine import ParseFailure
from gleaner.tasks.instag.stage import normalise_tag, read_tags, select_instag
from tests.support.openai_server import OpenAIStub, Reply

VOCABULARY = ["Code Generation", "Math", "Translation", "Creative Writing", "Summarization",
              "Question Answering", "Data Analysis", "Cosplay", "Grammar Check", "Planning",
              "Recipes", "History", "Poetry", "Debugging", "Advice", "Classification"]


def answer(tags: list[str]) -> str:
    return json.dumps([{"tag": t, "explanation": f"about {t.lower()}"} for t in tags])


def test_tags_are_read_from_the_json_list_and_normalised() -> None:
    reply = SimpleNamespace(text="Sure! " + answer(["Code Generation", "code-generation",
                                                     "Code generations", "Math"]) + " Done.")
    assert read_tags(reply) == ["code generation", "math"]  # near-identical tags merged
    assert normalise_tag("  Spelling and Grammar Check! ") == "spelling and grammar check"
    assert normalise_tag("Glass") == "glass" and normalise_tag("Tasks") == "task"
    for text, reason in (("no list here", "no JSON list"), ('[{"tag": 3}]', "no {\"tag\""),
                         ("[{'tag': 'x'}]", "not valid JSON")):
        with pytest.raises(ParseFailure, match=re.escape(reason)):
            read_tags(SimpleNamespace(text=text))


def reference_selection(ids, tags, budget, min_frequency):
    """InsTag's complexity-first diverse sampling, straight from the method's description."""
    frequency: dict[str, int] = {}
    for row in tags:
        for tag in set(row or []):
            frequency[tag] = frequency.get(tag, 0) + 1
    kept_tags = [None if row is None else {t for t in row if frequency[t] >= min_frequency}
                 for row in tags]
    walk = sorted((i for i in range(len(ids)) if kept_tags[i] is not None),
                  key=lambda i: (-len(kept_tags[i]), ids[i]))
    chosen, covered = [], set()
    for i in walk:
        if len(chosen) == budget:
            break
        if kept_tags[i] - covered:
            chosen.append(ids[i])
            covered |= kept_tags[i]
    return chosen


@pytest.mark.parametrize("min_frequency", [1, 3])
def test_selection_is_complexity_first_then_new_tags_on_200_rows(min_frequency: int) -> None:
    rng = random.Random(7 + min_frequency)
    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:12] for i in range(200)]
    tags = [None if rng.random() < 0.05 else
            rng.sample([normalise_tag(t) for t in VOCABULARY] + [f"rare {i}"], rng.randint(1, 5))
            for i in range(200)]
    manifest = select_instag(ids, tags, 12, min_frequency)
    assert manifest.selected_ids == reference_selection(ids, tags, 12, min_frequency)
    assert manifest.selected.sum() == len(manifest.selected_ids) <= 12
    assert {"kept", "too_similar", "failed_upstream"} <= set(manifest.reason)
    untagged = [i for i, row in enumerate(tags) if row is None]
    assert all(manifest.reason[i] == "failed_upstream" for i in untagged)
    assert len(manifest.reason) == 200  # every example accounted for


def tagger(body: dict) -> Reply:
    """Tags from a hash of the query: 1-4 of the vocabulary; 'Say OK.' probes get a list;
    queries with 'PROSE' answer prose (a parse failure after the retries)."""
    user = body["messages"][-1]["content"]
    query = user.split("User query: ", 1)[-1].split("\nPlease provide", 1)[0]
    if "PROSE" in query:
        return Reply("I think this is about many things.")
    digest = int(hashlib.sha256(query.encode()).hexdigest(), 16)
    count = 1 + digest % 4
    return Reply(answer([VOCABULARY[(digest >> (4 * k)) % len(VOCABULARY)]
                         for k in range(count)]), prompt_tokens=120, completion_tokens=40)


@pytest.mark.slow
def test_tag_then_select_on_a_loopback_tagger(prefect_api, ray_local, shared_data: Path,
                                              tmp_path: Path) -> None:
    from gleaner.flows.cli import app
    from gleaner.schema import Example, examples_to_table
    from gleaner.store import Store

    records = json.loads((shared_data / "alpaca" / "alpaca_random_9k.json").read_text())[:30]
    records[3]["instruction"] = "PROSE " + records[3]["instruction"]
    store = Store(str(tmp_path / "store"))
    store.write_part("tags", "ingest", 0, examples_to_table(
        [Example("alpaca", i, r["instruction"], r["input"], r["output"])
         for i, r in enumerate(records)]))
    runner = CliRunner()
    with OpenAIStub(tagger) as stub:
        args = ["tag", "--run-id", "tags", "--store", store.url, "--base-url", stub.base_url,
                "--model", "gpt-3.5-turbo", "--json"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        sent = stub.count()
        again = runner.invoke(app, args)  # resumed: nothing asked again
        assert again.exit_code == 0 and stub.count() == sent
    assert (summary["examples"], summary["ok"], summary["failed"]) == (30, 29, 1)
    assert sent == 1 + 29 + 3  # the probe, the tagged, the prose one asked 1 + 2 times
    rows = {r["id"]: r for r in store.read_stage("tags", "tag").to_pylist()}
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert failed[0]["error_kind"] == "parse" and "no JSON list" in failed[0]["error"]
    assert all(r["tag_count"] == len(r["tags"]) for r in rows.values() if r["status"] == "ok")

    selected = runner.invoke(app, ["select", "--run-id", "tags", "--store", store.url,
                                   "--selector", "instag", "--size", "6", "--json"])
    assert selected.exit_code == 0, selected.output
    manifest = {r["id"]: r for r in store.read_stage("tags", "select").to_pylist()}
    ids = sorted(rows)
    expected = reference_selection(ids, [rows[i]["tags"] if rows[i]["status"] == "ok" else None
                                         for i in ids], 6, 1)
    picked = sorted((r for r in manifest.values() if r["selected"]), key=lambda r: r["rank"])
    assert [r["id"] for r in picked] == expected
    assert len(manifest) == 30  # every example has a verdict and a reason


def test_curate_plan_and_grid_reach_the_stage_by_its_registration(tmp_path: Path) -> None:
    from gleaner.config import GleanerConfig
    from gleaner.tasks.cost.plan import llm_stages
    from gleaner.tasks.experiment.arms import plan_selections
    from gleaner.tasks.experiment.pool import needed_stages

    config = GleanerConfig.model_validate({
        "curate": {"signals": ["tag"]},
        "experiment": {"arms": ["full", {"name": "instag-6", "selector": "instag",
                                         "size": 6}]}})
    assert "tag" in [s.name for s in llm_stages(config)]  # priced before anything is sent
    assert needed_stages(plan_selections(config, "pool")) == ["tag"]
    with pytest.raises(ValueError, match="unknown pool_stage 'tags'"):
        GleanerConfig.model_validate({"curate": {"signals": ["tags"]}})
