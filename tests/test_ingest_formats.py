"""Record formats (ShareGPT, OpenAI messages, Dolly, LIMA), file kinds (Parquet, CSV, gzip,
folders), the forced format, and what a rerun of the same run id does."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gleaner.config import GleanerConfig
from gleaner.engine import PlanMismatch
from gleaner.store import Store
from gleaner.tasks.ingest.ingest import run_ingest


def ingest(tmp_path: Path, *sources: Path | str, fmt: str = "auto", run_id: str = "r",
           store: Store | None = None, force: bool = False) -> tuple[dict, Store]:
    config = GleanerConfig()
    config.ingest.format = fmt
    store = store or Store(str(tmp_path / "store"))
    summary = run_ingest([str(s) for s in sources], store, run_id, config, force=force)
    assert summary["read"] == summary["kept"] + summary["quarantined"] + summary["duplicates"]
    return summary, store


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def turns(row: dict) -> list[tuple[str, str]]:
    return [(t["role"], t["content"]) for t in row["conversation"]]


def test_sharegpt_multi_turn_with_system(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"id": "c1", "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "Capital of France?"},
            {"from": "gpt", "value": "Paris."},
        ]},
        {"id": "c2", "conversations": [{"from": "human", "value": "Unanswered"}]},
        {"id": "c3", "conversations": [{"from": "robot", "value": "?"}]},
        {"id": "c4", "conversations": [{"from": "human", "value": "x"},
                                       {"from": "gpt", "value": None}]},
    ])
    summary, store = ingest(tmp_path, path)
    assert summary["sources"][0]["format"] == "sharegpt"
    (row,) = store.read_stage("r", "ingest").to_pylist()
    assert (row["instruction"], row["input"], row["output"]) == ("Capital of France?", "", "Paris.")
    assert turns(row) == [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"),
                          ("user", "Capital of France?"), ("assistant", "Paris.")]
    assert json.loads(row["metadata"]) == {"id": "c1"}
    reasons = {q["source_row"]: q for q in store.read_stage("r", "quarantine").to_pylist()}
    assert reasons[2]["field"] == "conversations" and "no response" in reasons[2]["reason"]
    assert reasons[3]["field"] == "conversations[0].from" and "'robot'" in reasons[3]["reason"]
    assert reasons[4]["field"] == "conversations[1].value" and "null" in reasons[4]["reason"]


def test_openai_messages(tmp_path):
    path = write_jsonl(tmp_path / "messages.jsonl", [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                      {"role": "assistant", "content": "hey"}]},
    ])
    summary, store = ingest(tmp_path, path)
    assert summary["sources"][0]["format"] == "messages"
    (row,) = store.read_stage("r", "ingest").to_pylist()
    assert turns(row) == [("user", "2+2?"), ("assistant", "4")]
    (bad,) = store.read_stage("r", "quarantine").to_pylist()
    assert bad["field"] == "messages[0].content" and "is a list, not a string" in bad["reason"]


def test_dolly_native_fields(tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "Summarise", "context": "Long text.", "response": "Short.",
         "category": "summarization"},
        {"instruction": "No answer", "context": "", "response": ""},
    ])
    summary, store = ingest(tmp_path, path)
    assert summary["sources"][0]["format"] == "dolly"
    (row,) = store.read_stage("r", "ingest").to_pylist()
    assert (row["input"], row["output"]) == ("Long text.", "Short.")
    assert json.loads(row["metadata"]) == {"category": "summarization"}
    assert turns(row) == [("user", "Summarise\n\nLong text."), ("assistant", "Short.")]
    (bad,) = store.read_stage("r", "quarantine").to_pylist()
    assert bad["field"] == "response"


def test_forced_format_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "ambiguous.jsonl", [
        {"instruction": "q", "output": "a", "context": "from a wiki page"},
    ])
    auto, store = ingest(tmp_path, path)
    assert auto["sources"][0]["format"] == "dolly"  # 'context' reads as Dolly: no 'response'
    assert auto["reasons"] == {"empty_output": 1}
    forced, store = ingest(tmp_path, path, fmt="alpaca", run_id="forced")
    assert forced["sources"][0]["format"] == "alpaca"
    (row,) = store.read_stage("forced", "ingest").to_pylist()
    assert turns(row) == [("user", "q"), ("assistant", "a")]
    assert json.loads(row["metadata"]) == {"context": "from a wiki page"}


def test_alpaca_history_and_system_are_turns(tmp_path):
    path = write_jsonl(tmp_path / "factory.jsonl", [
        {"instruction": "q2", "input": "", "output": "a2", "history": [["q1", "a1"]],
         "system": "Be kind."},
        {"instruction": "q", "output": "a", "history": [["only one"]]},
    ])
    summary, store = ingest(tmp_path, path, fmt="alpaca")
    (row,) = store.read_stage("r", "ingest").to_pylist()
    assert turns(row) == [("system", "Be kind."), ("user", "q1"), ("assistant", "a1"),
                          ("user", "q2"), ("assistant", "a2")]
    assert json.loads(row["metadata"]) == {}
    (bad,) = store.read_stage("r", "quarantine").to_pylist()
    assert bad["field"] == "history[0]" and "pair" in bad["reason"]


def test_parquet_csv_and_gzip_sources(tmp_path):
    table = pa.table({
        "instruction": ["p1", "p2", None],
        "input": ["", "ctx", ""],
        "output": ["o1", "o2", "o3"],
        "score": [1, 2, 3],
    })
    pq.write_table(table, tmp_path / "data.parquet")
    (tmp_path / "data.csv").write_text(
        'instruction,input,output\n'
        'c1,,"line one\nline two"\n'
        'c2,x,y\n'
        ',,orphan\n', encoding="utf-8")
    with gzip.open(tmp_path / "data.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"instruction": "g1", "input": "", "output": "z"}) + "\n")
    summary, store = ingest(tmp_path, tmp_path / "data.parquet", tmp_path / "data.csv",
                            tmp_path / "data.jsonl.gz")
    kinds = {Path(s["source"]).name: (s["kind"], s["format"]) for s in summary["sources"]}
    assert kinds == {"data.parquet": ("parquet", "alpaca"), "data.csv": ("csv", "alpaca"),
                     "data.jsonl.gz": ("jsonl", "alpaca")}
    rows = {r["instruction"]: r for r in store.read_stage("r", "ingest").to_pylist()}
    assert set(rows) == {"p1", "p2", "c1", "c2", "g1"}
    assert json.loads(rows["p2"]["metadata"]) == {"score": 2} and rows["p2"]["source_row"] == 1
    assert rows["c1"]["output"] == "line one\nline two" and rows["c1"]["source_row"] == 2
    assert rows["c2"]["source_row"] == 4  # CSV rows are line numbers; c1 spans lines 2-3
    quarantine = {(Path(q["source"]).name, q["source_row"]): q["reason"]
                  for q in store.read_stage("r", "quarantine").to_pylist()}
    assert set(quarantine) == {("data.parquet", 2), ("data.csv", 5)}


def test_a_folder_source_reads_its_data_files(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", [{"instruction": "a", "output": "1"}])
    write_jsonl(folder / "sub" / "b.jsonl", [{"instruction": "b", "output": "2"}])
    (folder / "notes.txt").write_text("not data")
    summary, _ = ingest(tmp_path, folder)
    assert [Path(s["source"]).name for s in summary["sources"]] == ["a.jsonl", "b.jsonl"]
    assert summary["kept"] == 2


def test_rerun_reuses_redo_needs_force_and_interrupted_attempts_are_redone(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "1"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "b", "output": "2"}])
    first, store = ingest(tmp_path, a)
    again, _ = ingest(tmp_path, a, store=store)
    assert again["reused"] is True and again["kept"] == first["kept"]
    # a store from before steps kept records: its ingest is adopted, not redone or replaced
    store.fs.rm(store.run_path("r", "steps", "ingest.json"))
    adopted, _ = ingest(tmp_path, a, store=store)
    assert adopted["reused"] is True and store.exists(store.run_path("r", "steps",
                                                                     "ingest.json"))
    store.fs.rm(store.run_path("r", "steps", "ingest.json"))
    with pytest.raises(PlanMismatch, match="already holds an ingest of other sources"):
        ingest(tmp_path, b, store=store)
    ingest(tmp_path, a, store=store)  # adopted again: the record is back
    with pytest.raises(PlanMismatch, match="other settings .source_files"):
        ingest(tmp_path, b, store=store)
    replaced, _ = ingest(tmp_path, b, store=store, force=True)
    assert [r["instruction"] for r in store.read_stage("r", "ingest").to_pylist()] == ["b"]
    assert replaced["reused"] is False
    # a forced attempt killed half-way left a part, no summary and no step record (force
    # removes it first): the rerun starts clean
    store.fs.rm(store.run_path("r", "ingest", "_summary.json"))
    store.fs.rm(store.run_path("r", "steps", "ingest.json"))
    stale = store.read_stage("r", "ingest")
    store.write_part("r", "ingest", 7, stale)
    redone, _ = ingest(tmp_path, a, store=store)
    assert store.finished_parts("r", "ingest") == {0}
    assert [r["instruction"] for r in store.read_stage("r", "ingest").to_pylist()] == ["a"]
    assert redone["kept"] == 1


def test_batches_become_parts_of_batch_rows(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl",
                       [{"instruction": f"i{n}", "output": f"o{n}"} for n in range(25)])
    config = GleanerConfig()
    config.ingest.batch_rows = 10
    store = Store(str(tmp_path / "store"))
    summary = run_ingest([str(path)], store, "r", config)
    assert summary["parts"] == 3
    parts = store.part_paths(store.stage_path("r", "ingest")).values()
    assert [pq.read_metadata(p).num_rows for p in parts] == [10, 10, 5]
    rows = store.read_stage("r", "ingest").to_pylist()
    assert [r["source_row"] for r in rows] == list(range(1, 26))


def test_tsv_with_invalid_utf8_and_a_short_row(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_bytes(
        b"instruction\tinput\toutput\tlang\n"
        b"t1\t\tfine\ten\n"
        b"t2\t\tbad \xff byte\ten\n"
        b"t3\t\tok\tfr\xe9\n"
        b"t4\n"
    )
    summary, store = ingest(tmp_path, path)
    assert summary["sources"][0]["kind"] == "tsv"
    (row,) = store.read_stage("r", "ingest").to_pylist()
    assert row["instruction"] == "t1" and json.loads(row["metadata"]) == {"lang": "en"}
    quarantine = {q["source_row"]: q for q in store.read_stage("r", "quarantine").to_pylist()}
    assert quarantine[3]["field"] == "output" and "invalid UTF-8" in quarantine[3]["reason"]
    assert quarantine[4]["field"] == "lang" and "invalid UTF-8" in quarantine[4]["reason"]
    assert quarantine[5]["field"] == "output" and "no response" in quarantine[5]["reason"]


def test_limit_reads_only_the_first_records_over_all_sources(tmp_path: Path) -> None:
    """ingest.limit (demo runs): the first N records in source order, counted honestly."""
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(
        json.dumps({"instruction": f"a{i}", "input": "", "output": "x"}) + "\n" for i in range(3)
    ))
    second.write_text("".join(
        json.dumps({"instruction": f"b{i}", "input": "", "output": "x"}) + "\n" for i in range(5)
    ))
    config = GleanerConfig().with_overrides({"ingest.limit": 5})
    store = Store(str(tmp_path / "store"))
    summary = run_ingest([str(first), str(second)], store, "lim", config)
    assert (summary["read"], summary["kept"]) == (5, 5)
    kept = store.read_stage("lim", "ingest", columns=["instruction"]).column("instruction")
    assert kept.to_pylist() == ["a0", "a1", "a2", "b0", "b1"]
