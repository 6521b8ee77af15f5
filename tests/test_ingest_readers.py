"""The streaming readers at their edges: chunk boundaries anywhere (inside numbers, strings,
multi-byte characters), records bigger than a chunk or than the limit, BOMs, trailing text."""

from __future__ import annotations

import io
import json

import pytest

import gleaner.tasks.ingest.readers as readers
from gleaner.tasks.ingest.readers import read_json_array, read_jsonl

LIMIT = 64 * 2**20


def values(items) -> list:
    return [value for _, value, problem, _ in items if problem is None]


def problems(items) -> list:
    return [(row, problem.code, problem.reason) for row, _, problem, _ in items if problem]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 4096])
def test_any_chunk_size_reads_the_same_records(monkeypatch, shared_data, chunk):
    data = (shared_data / "lima" / "lima.json").read_bytes()
    expected = json.loads(data)
    if chunk < 64:  # tiny chunks are slow in pure Python: a slice of the file with every shape
        expected = expected[-40:]  # the multi-turn rows, with non-ASCII text
        data = json.dumps(expected, ensure_ascii=False, indent=1).encode("utf-8")
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)
    items = list(read_json_array(io.BytesIO(data), LIMIT))
    assert values(items) == expected
    assert [row for row, *_ in items] == list(range(len(expected)))


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_numbers_and_multibyte_characters_split_across_chunks(monkeypatch, chunk):
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)
    data = '\ufeff[1234567, -0.25e3, "é€😀", {"k": "日本語"}, true, null]  \n'.encode()
    assert values(read_json_array(io.BytesIO(data), LIMIT)) == [
        1234567, -250.0, "é€😀", {"k": "日本語"}, True, None]


def test_a_record_bigger_than_a_chunk_comes_through(monkeypatch):
    monkeypatch.setattr(readers, "CHUNK_BYTES", 1024)
    big = {"instruction": "i", "output": "x" * 50_000}
    data = json.dumps([{"a": 1}, big, {"b": 2}]).encode()
    assert values(read_json_array(io.BytesIO(data), LIMIT)) == [{"a": 1}, big, {"b": 2}]


def test_an_element_over_the_record_limit_stops_the_array_with_a_reason(monkeypatch):
    monkeypatch.setattr(readers, "CHUNK_BYTES", 1024)
    data = json.dumps([{"a": 1}, {"big": "y" * 20_000}, {"b": 2}]).encode()
    items = list(read_json_array(io.BytesIO(data), max_record_bytes=5_000))
    assert values(items) == [{"a": 1}]
    ((row, code, reason),) = problems(items)
    assert (row, code) == (1, "too_large") and "ingest.max_record_bytes" in reason


def test_jsonl_line_over_the_record_limit_is_quarantined_and_reading_goes_on():
    data = b'{"a": 1}\n' + json.dumps({"big": "z" * 10_000}).encode() + b'\n{"b": 2}\n'
    items = list(read_jsonl(io.BytesIO(data), max_record_bytes=1_000))
    assert values(items) == [{"a": 1}, {"b": 2}]
    assert [(row, code) for row, code, _ in problems(items)] == [(2, "too_large")]


def test_jsonl_with_bom_and_crlf():
    data = b'\xef\xbb\xbf{"a": 1}\r\n\r\n{"b": 2}\r\n'
    items = list(read_jsonl(io.BytesIO(data), LIMIT))
    assert values(items) == [{"a": 1}, {"b": 2}]
    assert [row for row, *_ in items] == [1, 3]


@pytest.mark.parametrize(
    ("text", "code", "phrase"),
    [
        ('[{"a": 1}] trailing', "invalid_json", "after the end of the JSON array"),
        ('[{"a": 1} {"b": 2}]', "invalid_json", "expected ',' or ']' after element 0"),
        ('[{"a": 1},', "truncated", "ends before element 1"),
        ('[{"a": 1}', "truncated", "without ']'"),
        ("[", "truncated", "ends after '['"),
        ("[ ]", "empty_file", "no records"),
        ("   \n", "empty_file", "no records"),
        ('{"a": 1}', "invalid_json", "not a JSON array"),
    ],
)
def test_array_structure_problems(text, code, phrase):
    items = list(read_json_array(io.BytesIO(text.encode()), LIMIT))
    ((_, got_code, reason),) = problems(items)
    assert got_code == code and phrase in reason
