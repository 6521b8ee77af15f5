"""Ingest of the real instruction files in ../shared/data: counts, formats, turn order.

Expected counts are derived from the files themselves (parsed here with the
standard json module), not typed in, except the duplicate counts the data
README states (dolly_3k: 2, alpaca_gpt4_sample_999: 14), which are also
cross-checked against the file.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from gleaner.config import GleanerConfig
from gleaner.runs import read_run
from gleaner.schema import example_id
from gleaner.store import Store
from gleaner.tasks.ingest.ingest import run_ingest


def _ingest(tmp_path: Path, *sources: Path, **ingest_settings) -> tuple[dict, Store]:
    config = GleanerConfig()
    for key, value in ingest_settings.items():
        setattr(config.ingest, key, value)
    store = Store(str(tmp_path / "store"))
    summary = run_ingest([str(s) for s in sources], store, "real", config)
    assert summary["read"] == summary["kept"] + summary["quarantined"] + summary["duplicates"]
    return summary, store


def _exact_duplicates(records: list[dict]) -> int:
    keys = Counter(json.dumps([r["instruction"], r["input"], r["output"]]) for r in records)
    return sum(n - 1 for n in keys.values())


@pytest.mark.parametrize(
    ("relative", "stated_duplicates"),
    [("dolly/dolly_3k.json", 2), ("alpaca_gpt4/alpaca_gpt4_sample_999.json", 14)],
)
def test_duplicates_are_kept_once_and_counted(tmp_path, shared_data, relative, stated_duplicates):
    path = shared_data / relative
    records = json.loads(path.read_text())
    assert _exact_duplicates(records) == stated_duplicates  # the README's figure holds
    summary, store = _ingest(tmp_path, path)
    assert summary["sources"][0]["format"] == "alpaca"
    assert summary["sources"][0]["kind"] == "json"
    assert summary["read"] == len(records)
    assert summary["duplicates"] == stated_duplicates
    assert summary["quarantined"] == 0
    assert summary["kept"] == len(records) - stated_duplicates
    table = store.read_stage("real", "ingest")
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == summary["kept"]
    # the first occurrence is the one kept: its row number points at that record
    first = {}
    for i, r in enumerate(records):
        first.setdefault(example_id(r["instruction"], r["input"], r["output"]), i)
    assert {row["id"]: row["source_row"] for row in table.to_pylist()} == first
    # every dropped duplicate is listed, with the id of the example kept in its place
    dropped = store.read_stage("real", "duplicates").to_pylist()
    assert len(dropped) == stated_duplicates
    for d in dropped:
        r = records[d["source_row"]]
        assert example_id(r["instruction"], r["input"], r["output"]) == d["id"]
        assert first[d["id"]] < d["source_row"]


def test_dolly_category_lands_in_metadata(tmp_path, shared_data):
    path = shared_data / "dolly" / "dolly_3k.json"
    records = json.loads(path.read_text())
    _, store = _ingest(tmp_path, path)
    rows = store.read_stage("real", "ingest").to_pylist()
    for row in rows[:200]:
        source = records[row["source_row"]]
        assert json.loads(row["metadata"]) == {"category": source["category"]}
        assert (row["instruction"], row["input"], row["output"]) == (
            source["instruction"], source["input"], source["output"])


def test_lima_multi_turn_rows_keep_their_turns_in_order(tmp_path, shared_data):
    path = shared_data / "lima" / "lima.json"
    records = json.loads(path.read_text())
    summary, store = _ingest(tmp_path, path)
    assert summary["sources"][0]["format"] == "lima"
    assert summary["read"] == summary["kept"] == len(records)
    rows = store.read_stage("real", "ingest").to_pylist()
    multi = [row for row in rows if len(row["conversation"]) > 2]
    assert len(multi) == 29 == sum(1 for r in records if r["history"])
    for row in multi:
        source = records[row["source_row"]]
        expected = []
        for user, assistant in source["history"]:
            expected += [("user", user), ("assistant", assistant)]
        expected += [("user", source["instruction"]), ("assistant", source["output"])]
        assert [(t["role"], t["content"]) for t in row["conversation"]] == expected
        assert "history" not in json.loads(row["metadata"])
    # the longest one (9 earlier exchanges) survived intact
    assert max(len(row["conversation"]) for row in multi) == 2 * (1 + max(
        len(r["history"]) for r in records))


def test_alpaca_random_9k_quarantines_the_empty_responses(tmp_path, shared_data):
    path = shared_data / "alpaca" / "alpaca_random_9k.json"
    records = json.loads(path.read_text())
    empty = [i for i, r in enumerate(records) if not r["output"].strip()]
    assert empty  # the real-world mess the README mentions
    summary, store = _ingest(tmp_path, path)
    assert summary["sources"][0]["format"] == "alpaca"
    assert summary["read"] == len(records)
    assert summary["quarantined"] == len(empty)
    assert summary["reasons"] == {"empty_output": len(empty)}
    assert summary["kept"] + summary["duplicates"] == len(records) - len(empty)
    quarantine = store.read_stage("real", "quarantine").to_pylist()
    assert sorted(q["source_row"] for q in quarantine) == empty
    assert {q["field"] for q in quarantine} == {"output"}
    assert all(q["source"] == str(path.resolve()) for q in quarantine)
    run = read_run(store, "real")
    assert run["ingest"]["kept"] == summary["kept"]


def test_all_instruction_files_at_once_dedup_across_sources(tmp_path, shared_data):
    files = [
        shared_data / "alpaca" / "alpaca_random_9k.json",
        shared_data / "alpaca_gpt4" / "alpaca_gpt4_sample_999.json",
        shared_data / "dolly" / "dolly_3k.json",
        shared_data / "lima" / "lima.json",
    ]
    summary, store = _ingest(tmp_path, *files)
    per_file = [len(json.loads(f.read_text())) for f in files]
    assert [s["read"] for s in summary["sources"]] == per_file
    assert summary["read"] == sum(per_file)
    table = store.read_stage("real", "ingest", columns=["id", "source"])
    assert table.num_rows == summary["kept"]
    assert len(set(table.column("id").to_pylist())) == summary["kept"]
    assert {str(f.resolve()) for f in files} == set(table.column("source").to_pylist())
    # parts are batch_rows rows each
    assert summary["parts"] == len(store.finished_parts("real", "ingest"))


def test_lima_test_set_jsonl_prompts_need_require_output_off(tmp_path, shared_data):
    path = shared_data / "lima" / "lima_test_set.jsonl"
    prompts = [json.loads(line)["conversations"] for line in path.read_text().splitlines()]
    strict, _ = _ingest(tmp_path / "strict", path)
    assert strict["sources"][0] == {**strict["sources"][0], "kind": "jsonl", "format": "lima"}
    assert strict["quarantined"] == len(prompts) and strict["kept"] == 0
    assert strict["reasons"] == {"empty_output": len(prompts)}
    lenient, store = _ingest(tmp_path / "lenient", path, require_output=False)
    assert lenient["kept"] + lenient["duplicates"] == len(prompts)
    rows = store.read_stage("real", "ingest").to_pylist()
    assert rows[0]["source_row"] == 1  # JSONL rows are line numbers
    assert rows[0]["instruction"] == prompts[0] and rows[0]["output"] == ""


def test_same_examples_get_the_same_ids_in_any_source_file(tmp_path, shared_data):
    records = json.loads((shared_data / "alpaca_gpt4" / "alpaca_gpt4_sample_999.json").read_text())
    jsonl = tmp_path / "copy.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records[:300]))
    original = shared_data / "alpaca_gpt4" / "alpaca_gpt4_sample_999.json"
    summary, _ = _ingest(tmp_path, original, jsonl)
    copy = summary["sources"][1]
    assert copy["kind"] == "jsonl" and copy["kept"] == 0 and copy["duplicates"] == 300
