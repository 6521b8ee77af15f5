"""A corpus of bad input written by the test: every bad row is quarantined with file, row, field
and reason; good rows still come through; read = kept + quarantined + duplicates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gleaner.config import GleanerConfig
from gleaner.store import Store
from gleaner.tasks.ingest.ingest import IngestError, run_ingest


def good(n: int) -> dict:
    return {"instruction": f"Say the number {n}.", "input": "", "output": f"{n}"}


def line(record) -> bytes:
    return json.dumps(record).encode() + b"\n"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    big = "x" * 2_000_000
    (folder / "mixed.jsonl").write_bytes(
        line(good(1))                                                     # 1 kept
        + b'{"instruction": "broken", "output": \n'                        # 2 not JSON
        + line({"input": "a", "output": "b"})                             # 3 no instruction
        + line({"instruction": 5, "output": "five"})                      # 4 number
        + line({"instruction": "ok", "output": 42})                       # 5 number
        + b'{"instruction": "hi", "output": "bad \xff\xfe bytes"}\n'      # 6 invalid UTF-8
        + line({"instruction": "empty", "output": "   "})                 # 7 empty response
        + line({"instruction": "big", "output": big})                     # 8 2 MB response
        + line(good(2))                                                   # 9 kept
        + b"\n"                                                           # 10 blank: no record
        + line(good(1))                                                   # 11 duplicate of 1
        + line([1, 2])                                                    # 12 not an object
        + b'{"instruction": "q", "output": "a", "category": "\xc3\x28"}\n'  # 13 bad UTF-8 extra
        + line({"instruction": "   ", "output": "a"})                     # 14 blank instruction
        + line(good(3))                                                   # 15 kept
    )
    (folder / "empty.jsonl").write_bytes(b"")
    records = [good(10), good(11), good(12)]
    text = json.dumps(records, indent=2)
    cut = text[: text.rindex("}") + 1] + ',\n  {"instruction": "cut off he'  # 4th element cut
    (folder / "cut.json").write_text(cut)
    # an array whose elements are bad in their own ways; the ones after still come through
    array = (
        b'[{"instruction": "a1", "output": "fine"},\n'
        b' {"instruction": "a2", "output": "bytes \xe9 here"},\n'
        b' 7,\n'
        b' {"instruction": ["a", "list"], "output": "x"},\n'
        b' {"instruction": "a5", "output": "also fine"}]\n'
    )
    (folder / "array.json").write_bytes(array)
    return folder


def run(folder: Path, tmp_path: Path, *names: str) -> tuple[dict, list[dict], list[dict]]:
    store = Store(str(tmp_path / "store"))
    summary = run_ingest([str(folder / n) for n in names], store, "bad", GleanerConfig())
    assert summary["read"] == summary["kept"] + summary["quarantined"] + summary["duplicates"]
    for source in summary["sources"]:
        assert source["read"] == source["kept"] + source["quarantined"] + source["duplicates"]
    kept = store.read_stage("bad", "ingest").to_pylist() if summary["kept"] else []
    quarantine = store.read_stage("bad", "quarantine").to_pylist()
    return summary, kept, quarantine


def by_row(quarantine: list[dict], name: str) -> dict[int, dict]:
    return {q["source_row"]: q for q in quarantine if Path(q["source"]).name == name}


def test_every_bad_line_gets_its_reason(corpus, tmp_path):
    summary, kept, quarantine = run(corpus, tmp_path, "mixed.jsonl")
    assert [r["source_row"] for r in kept] == [1, 9, 15]
    assert [r["output"] for r in kept] == ["1", "2", "3"]
    assert (summary["read"], summary["kept"], summary["quarantined"], summary["duplicates"]) == (
        14, 3, 10, 1)
    rows = by_row(quarantine, "mixed.jsonl")
    expected = {
        2: (None, "not valid JSON"),
        3: ("instruction", "lacks an instruction"),
        4: ("instruction", "is a number, not a string"),
        5: ("output", "is a number, not a string"),
        6: ("output", "invalid UTF-8"),
        7: ("output", "no response"),
        8: ("output", "2,000,"),
        12: (None, "not an object"),
        13: ("category", "invalid UTF-8"),
        14: ("instruction", "lacks an instruction"),
    }
    assert set(rows) == set(expected)
    for row, (field, phrase) in expected.items():
        assert rows[row]["field"] == field, row
        assert phrase in rows[row]["reason"], (row, rows[row]["reason"])
        assert rows[row]["source"] == str((corpus / "mixed.jsonl").resolve())
    assert summary["reasons"] == {
        "invalid_json": 1, "missing_instruction": 2, "not_a_string": 2, "invalid_utf8": 2,
        "empty_output": 1, "too_large": 1, "not_an_object": 1,
    }
    # the raw excerpt is kept, truncated, and shows undecodable bytes instead of losing them
    assert "\\xff\\xfe" in rows[6]["raw"]
    assert len(rows[8]["raw"]) <= 1000


def test_empty_file_is_reported(corpus, tmp_path):
    summary, kept, quarantine = run(corpus, tmp_path, "empty.jsonl", "mixed.jsonl")
    assert summary["sources"][0]["read"] == 1 and summary["sources"][0]["quarantined"] == 1
    (row,) = by_row(quarantine, "empty.jsonl").values()
    assert row["reason"].startswith("empty file")
    assert summary["reasons"]["empty_file"] == 1
    assert len(kept) == 3  # the other source is unaffected


def test_cut_off_array_keeps_rows_before_the_cut(corpus, tmp_path):
    summary, kept, quarantine = run(corpus, tmp_path, "cut.json")
    assert [r["instruction"] for r in kept] == [good(n)["instruction"] for n in (10, 11, 12)]
    assert [r["source_row"] for r in kept] == [0, 1, 2]
    (row,) = quarantine
    assert row["source_row"] == 3
    assert "cut off" in row["reason"] and "element 3" in row["reason"]
    assert '"instruction": "cut off he' in row["raw"]
    assert summary["reasons"] == {"truncated": 1}


def test_bad_array_elements_are_quarantined_one_by_one(corpus, tmp_path):
    summary, kept, quarantine = run(corpus, tmp_path, "array.json")
    assert [r["instruction"] for r in kept] == ["a1", "a5"]
    assert [r["source_row"] for r in kept] == [0, 4]
    rows = by_row(quarantine, "array.json")
    assert rows[1]["field"] == "output" and "invalid UTF-8" in rows[1]["reason"]
    assert "\\xe9" in rows[1]["raw"]
    assert "not an object" in rows[2]["reason"]
    assert rows[3]["field"] == "instruction" and "is a list, not a string" in rows[3]["reason"]
    assert summary["read"] == 5


def test_the_whole_corpus_adds_up(corpus, tmp_path):
    summary, kept, quarantine = run(corpus, tmp_path, "*")  # a glob: all four files
    assert len(summary["sources"]) == 4
    assert summary["kept"] == len(kept) == 3 + 3 + 2
    assert summary["quarantined"] == len(quarantine) == 10 + 1 + 1 + 3
    assert summary["duplicates"] == 1


def test_limits_come_from_the_config(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"instruction": "i", "output": "é" * 600}) + "\n")
    config = GleanerConfig()
    config.ingest.max_field_bytes = 1000  # 600 characters but 1,200 UTF-8 bytes
    summary = run_ingest([str(path)], Store(str(tmp_path / "s")), "r", config)
    assert summary["reasons"] == {"too_large": 1}
    config.ingest.max_field_bytes = 1200
    summary = run_ingest([str(path)], Store(str(tmp_path / "s2")), "r", config)
    assert summary["kept"] == 1


def test_malformed_element_mid_array_stops_that_file_with_a_reason(tmp_path):
    path = tmp_path / "mid.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"},\n'
                    ' {"instruction": "e", "output": "f"}]')
    summary = run_ingest([str(path)], Store(str(tmp_path / "s")), "r", GleanerConfig())
    assert (summary["kept"], summary["quarantined"]) == (1, 1)
    sample = summary["quarantine_samples"][0]
    assert sample["source_row"] == 1
    assert "line 2" in sample["reason"] and "rest of the file could not be read" in sample["reason"]


@pytest.mark.parametrize("source", ["missing.json", "nothing-*.jsonl"])
def test_a_source_that_cannot_be_opened_stops_the_run_naming_it(tmp_path, source):
    (tmp_path / "ok.jsonl").write_text(json.dumps(good(1)) + "\n")
    store = Store(str(tmp_path / "store"))
    with pytest.raises(IngestError, match=source.replace("*", r"\*")):
        sources = [str(tmp_path / "ok.jsonl"), str(tmp_path / source)]
        run_ingest(sources, store, "r", GleanerConfig())
    assert not store.has_stage("r", "ingest")  # nothing written before the check


def test_a_file_in_no_known_format_stops_the_run(tmp_path, shared_data):
    store = Store(str(tmp_path / "store"))
    with pytest.raises(IngestError, match="vicuna_test_set.jsonl.*--format"):
        run_ingest([str(shared_data / "eval_sets" / "vicuna_test_set.jsonl")], store, "r",
                   GleanerConfig())
