"""Test-set decontamination: the n-gram and exact rules on planted copies and a near miss,
the stage over real Alpaca records with ``gleaner decontaminate`` (Prefect, Ray, the store),
selection leaving the marked examples out with reason ``contaminated`` (counts add up), a
changed test set refused on rerun, bad and empty inputs, and ``curate`` on a pool that is
all contamination exiting non-zero."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gleaner.tasks.decontam.stage import PromptIndex, load_test_sets, normalise
from gleaner.tasks.evaluate.eval_sets import EvalPrompt, EvalSetError

KOALA = ("List the layers of the TCP/IP model and for each layer identify one protocol "
         "that is commonly used at that layer of the network stack.")


def index_of(*prompts: str, n: int = 13) -> PromptIndex:
    return PromptIndex.build({"koala": [EvalPrompt("koala", f"k{i}", p)
                                      for i, p in enumerate(prompts)]}, n)


def test_a_13_gram_copy_and_a_normalised_exact_copy_are_marked_and_a_near_miss_is_not() -> None:
    index = index_of(KOALA, "How can I improve my time management skills?")
    words = normalise(KOALA).split()
    copied = "Please answer briefly. " + " ".join(words[3:16]) + " Thanks a lot!"  # 13 words
    near = "Please answer briefly. " + " ".join(words[3:15]) + " Thanks a lot!"  # 12 words
    assert index.match([copied]) == {
        "contaminated": True, "rule": "ngram", "test_set": "koala", "test_id": "k0",
        "matched": " ".join(words[3:16])}
    assert index.match([near]) is None
    exact = index.match(["how can I improve my time-management   skills"])
    assert exact is not None and (exact["rule"], exact["test_id"]) == ("exact", "k1")
    assert index.match(["How can I improve my time management skills at work?"]) is None
    # an earlier turn of a conversation counts as much as the last one
    assert index.match(["Hello there", copied])["rule"] == "ngram"
    assert index_of(KOALA, n=8).match([near])["rule"] == "ngram"  # the n-gram is a setting


def test_a_bad_test_file_names_its_file_and_line_and_an_empty_one_is_refused(tmp_path: Path
                                                                            ) -> None:
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"prompt": "one"}\n{"prompt": "two"}\n{"prompt": "three"\n')
    with pytest.raises(EvalSetError, match=rf"{bad}, line 3: not valid JSON"):
        load_test_sets([f"mine={bad}"], None)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"prompt": "one"}\n{"text": "two"}\n')
    with pytest.raises(EvalSetError, match=rf"{wrong}, line 2: field 'prompt'"):
        load_test_sets([str(wrong)], None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(EvalSetError, match="test set .*empty.jsonl' has no prompts"):
        load_test_sets([str(empty)], None)
    with pytest.raises(EvalSetError, match="decontaminate.test_sets is empty"):
        load_test_sets([], None)


def pool(records: list[dict[str, str]]):
    from gleaner.schema import Example, examples_to_table

    return examples_to_table([Example("alpaca", i, r["instruction"], r["input"], r["output"])
                              for i, r in enumerate(records)])


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.slow
def test_decontaminate_marks_then_select_leaves_them_out_and_counts_add_up(
        prefect_api, ray_local, shared_data: Path, tmp_path: Path) -> None:
    from gleaner.flows.cli import app
    from gleaner.store import Store

    sets = shared_data / "eval_sets"
    koala = json.loads((sets / "koala_test_set.jsonl").read_text().splitlines()[2])["prompt"]
    vicuna = json.loads((sets / "vicuna_test_set.jsonl").read_text().splitlines()[0])["text"]
    records = json.loads((shared_data / "alpaca" / "alpaca_random_9k.json").read_text())[:40]
    planted = [
        {"instruction": f"Answer this: {koala} Be brief.", "input": "", "output": "TCP/IP..."},
        {"instruction": vicuna.upper().replace("?", " ?!"), "input": "", "output": "Plan."},
        {"instruction": " ".join(normalise(koala).split()[:12]) + " please", "input": "",
         "output": "a near miss: 12 words of the prompt"},
    ]
    store = Store(str(tmp_path / "store"))
    store.write_part("dc", "ingest", 0, pool(records + planted))
    ids = store.read_stage("dc", "ingest", columns=["id"]).column("id").to_pylist()
    runner = CliRunner()
    args = ["decontaminate", "--run-id", "dc", "--store", store.url, "--test-sets",
            f"koala={sets / 'koala_test_set.jsonl'},vicuna={sets / 'vicuna_test_set.jsonl'}",
            "--test-sets", f"wizardlm={sets / 'wizardlm_test_set.jsonl'}", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = last_json(result.stdout)
    assert (summary["examples"], summary["contaminated"], summary["clean"]) == (43, 2, 41)
    assert summary["by_test_set"] == {"koala": 1, "vicuna": 1}
    assert summary["by_rule"] == {"ngram": 1, "exact": 1}
    assert set(summary["test_prompts"]) == {"koala", "vicuna", "wizardlm"}
    rows = {r["id"]: r for r in store.read_stage("dc", "decontaminate").to_pylist()}
    assert rows[ids[40]]["rule"] == "ngram" and rows[ids[40]]["test_id"] == "koala_2"
    assert rows[ids[41]]["rule"] == "exact" and rows[ids[41]]["test_id"] == "1"
    assert not rows[ids[42]]["contaminated"]

    changed = tmp_path / "koala.jsonl"  # the test set changed since: refused without --force
    changed.write_text((sets / "koala_test_set.jsonl").read_text().replace("TCP/IP", "OSI"))
    args[args.index("--test-sets") + 1] = f"koala={changed},vicuna={sets / 'vicuna_test_set.jsonl'}"
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "settings.test_sets" in refused.output

    selected = runner.invoke(app, ["select", "--run-id", "dc", "--store", store.url,
                                   "--selector", "random", "--budget", "50", "--json"])
    assert selected.exit_code == 0, selected.output
    counts = last_json(selected.stdout)["reasons"]
    assert counts["contaminated"] == 2 and counts["kept"] == 41
    assert sum(counts.values()) == 43
    manifest = {r["id"]: r for r in store.read_stage("dc", "select").to_pylist()}
    assert manifest[ids[40]]["reason"] == "contaminated:koala"
    assert manifest[ids[41]]["reason"] == "contaminated:vicuna"
    assert not manifest[ids[40]]["selected"] and manifest[ids[42]]["selected"]
    report = (tmp_path / "store" / "runs" / "dc" / "report" / "select-report.md").read_text()
    assert "| contaminated | 2 |" in report

    store.write_part("empty", "ingest", 0, pool([]))
    empty = runner.invoke(app, ["decontaminate", "--run-id", "empty", "--store", store.url,
                                "--test-sets", f"koala={sets / 'koala_test_set.jsonl'}"])
    assert empty.exit_code == 2 and "the pool is empty" in empty.output


@pytest.mark.slow
def test_curate_on_a_pool_that_is_all_contamination_says_so_and_exits_non_zero(
        prefect_api, ray_local, shared_data: Path, tmp_path: Path) -> None:
    from gleaner.flows.cli import app

    koala = [json.loads(line)["prompt"] for line in
             (shared_data / "eval_sets" / "koala_test_set.jsonl").read_text().splitlines()[:6]]
    source = tmp_path / "copies.json"
    source.write_text(json.dumps([{"instruction": p, "input": "", "output": "An answer."}
                                  for p in koala]))
    result = CliRunner().invoke(app, ["curate", str(source), "--store", str(tmp_path / "store"),
                                      "--run-id", "allbad", "--no-train", "--no-eval"])
    assert result.exit_code != 0
    assert "every one of the 6 examples of the pool is marked" in result.output
    assert "6 contaminated" in result.output
