"""Comparison data (GPT-4-LLM): single-answer grading parsed strictly, responses gathered from
sources and joined by id/prompt, pairs with s_l < s_h only, and the grading stage on the engine
against a loopback judge (exact prompts, cached per (prompt, response, judge))."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gleaner.tasks.compare.grading import GRADING_TEMPLATE, grading_messages, parse_rating
from gleaner.tasks.compare.pairs import Scored, build_pairs, prompt_pairs
from gleaner.tasks.compare.sources import Response, SourceResult, gather, prompt_id
from tests.support.openai_server import OpenAIStub, Reply


# ---- parsing -------------------------------------------------------------------------------
@pytest.mark.parametrize("text, score", [
    ("The answer is accurate and complete.\n\nRating: [[8]]", 8.0),
    ("Rating: [[10]]", 10.0),
    ("Explanation... [[3.5]]", 3.5),
    ("First [[2]], on reflection: Rating: [[6]]", 2.0),  # FastChat's re.search: the first
    ("Rating: [7]", 7.0),  # FastChat's fallback pattern
    ("Rating: [[11]]", None), ("Rating: [[0]]", None),  # outside the 1-10 scale
    ("A good answer, I would give it an eight.", None),
    ("", None),
])
def test_parse_rating(text: str, score: float | None) -> None:
    assert parse_rating(text) == score


def test_grading_prompt_is_fastchats_single_v1() -> None:
    messages = grading_messages("What is 2+2?", "4")
    assert messages[0] == {"role": "system", "content": "You are a helpful assistant."}
    user = messages[1]["content"]
    assert user.startswith("[Instruction]\nPlease act as an impartial judge and evaluate the "
                           "quality of the response provided by an AI assistant")
    assert user.endswith("[Question]\nWhat is 2+2?\n\n[The Start of Assistant's Answer]\n4\n"
                         "[The End of Assistant's Answer]")
    assert 'for example: "Rating: [[5]]".' in GRADING_TEMPLATE


# ---- pairs ---------------------------------------------------------------------------------
def test_three_responses_give_exactly_the_pairs_with_lower_and_higher_scores() -> None:
    a, b, c = Scored("a", "A", 3.0), Scored("b", "B", 8.0), Scored("c", "C", 5.0)
    pairs, ties = prompt_pairs([a, b, c])
    assert ties == 0
    assert {(p.chosen.id, p.rejected.id, p.margin) for p in pairs} == {
        ("b", "a", 5.0), ("c", "a", 2.0), ("b", "c", 3.0)}
    tied = [Scored("a", "A", 7.0), Scored("b", "B", 7.0), Scored("c", "C", 2.0)]
    pairs, ties = prompt_pairs(tied)
    assert ties == 1 and {(p.chosen.id, p.rejected.id) for p in pairs} == {("a", "c"), ("b", "c")}
    all_tied, ties = prompt_pairs([Scored(x, x, 4.0) for x in "abc"])
    assert all_tied == [] and ties == 3
    with_failure, ties = prompt_pairs([a, b, Scored("c", "C", None)])  # the judge failed on c
    assert [(p.chosen.id, p.rejected.id) for p in with_failure] == [("b", "a")] and ties == 0


def test_build_pairs_counts_add_up() -> None:
    turns = [{"role": "user", "content": "Q"}]
    rows = [{"id": f"r{i}", "prompt_id": "p1" if i < 3 else "p2", "turns": turns,
             "instruction": "Q", "input": "", "response": f"answer {i}", "sources": ["s"]}
            for i in range(5)]
    grades = {"r0": {"status": "ok", "score": 2.0}, "r1": {"status": "ok", "score": 9.0},
              "r2": {"status": "failed", "score": None}, "r3": {"status": "ok", "score": 4.0},
              "r4": {"status": "ok", "score": 4.0}}
    table, counts = build_pairs(rows, grades)
    assert counts == {"prompts": 2, "scored": 4, "failed": 1, "pairs": 1, "ties_skipped": 1,
                      "prompts_without_pair": 1}
    pair = table.to_pylist()[0]
    assert (pair["chosen"], pair["rejected"], pair["margin"]) == ("answer 1", "answer 0", 7.0)
    assert pair["chosen_score"] == 9.0 and pair["rejected_score"] == 2.0


# ---- gathering -----------------------------------------------------------------------------
def test_gather_joins_prompts_merges_identical_and_counts_everything() -> None:
    hi = (("user", "Say hi."),)
    results = {
        "original": SourceResult([Response(hi, "Say hi.", "", "Hi!", "original"),
                                  Response((("user", "Alone?"),), "Alone?", "", "Yes.",
                                           "original")]),
        "teacher": SourceResult([Response(hi, "Say hi.", "", "Hello there!", "teacher"),
                                 Response(hi, "Say hi.", "", "  ", "teacher")], unavailable=1),
        "file.jsonl": SourceResult([Response((("user", " Say hi. "),), "Say hi.", "", "Hi!",
                                             "file.jsonl")]),  # same prompt and response
    }
    gathered = gather(results)
    c = gathered.counts
    assert (c["responses_read"], c["empty_skipped"], c["duplicates_merged"]) == (5, 1, 1)
    assert (c["prompts"], c["prompts_judged"], c["prompts_single_response"]) == (2, 1, 1)
    assert c["responses"] == 2 and c["unavailable"] == {"teacher": 1}
    rows = {r["response"]: r for r in gathered.table.to_pylist()}
    assert set(rows) == {"Hi!", "Hello there!"}
    assert rows["Hi!"]["sources"] == ["original", "file.jsonl"]
    assert rows["Hi!"]["prompt_id"] == prompt_id(hi) == rows["Hello there!"]["prompt_id"]
    assert rows["Hi!"]["id"] != rows["Hello there!"]["id"]


# ---- the grading stage on the engine, through the CLI --------------------------------------
MARK = re.compile(r"\[s=(\d+)\]")
ANSWER = re.compile(r"\[The Start of Assistant's Answer\]\n(.*)\n\[The End", re.S)


def marker_judge(body: dict) -> Reply:
    """Grades an answer by its '[s=N]' marker; an answer marked [s=x] gets prose only."""
    answer = ANSWER.search(body["messages"][1]["content"]).group(1)
    if "[s=x]" in answer:
        return Reply("This answer is fine, but I will not give a number.")
    found = MARK.search(answer)
    score = found.group(1) if found else "5"  # the probe's "OK."
    return Reply(f"A short explanation.\n\nRating: [[{score}]]", prompt_tokens=200,
                 completion_tokens=20)


def write_run(store_dir: Path, run_id: str) -> list[dict]:
    import pyarrow as pa

    from gleaner.engine import rows_table
    from gleaner.schema import Example, examples_to_table
    from gleaner.store import Store
    from gleaner.tasks.generate.regenerate import REGENERATE_SCHEMA

    examples = [Example("pool", 0, "Name a colour.", "", "Blue [s=3]"),
                Example("pool", 1, "Add the numbers.", "2 and 3", "5 [s=9]"),
                Example("pool", 2, "Say nothing.", "", "... [s=x]")]
    store = Store(str(store_dir))
    table = examples_to_table(examples)
    store.write_part(run_id, "ingest", 0, table)
    teacher = [{"id": e.id, "teacher_model": "gpt-4", "prompt_version": "v1",
                "output_original": e.output, "output_teacher": out, "status": status,
                "finish_reason": "stop"}
               for e, out, status in zip(examples, ["Red [s=7]", "Five [s=9]", None],
                                         ["ok", "ok", "failed"], strict=True)]
    store.write_part(run_id, "regenerate", 0, rows_table(teacher, REGENERATE_SCHEMA))
    assert isinstance(table, pa.Table)
    return table.to_pylist()


def test_cli_compare_grades_each_response_once_and_writes_the_pairs(
        prefect_api, ray_local, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gleaner.flows.cli import app
    from gleaner.store import Store

    store_dir = tmp_path / "store"
    examples = write_run(store_dir, "cmp-run")
    answers = tmp_path / "model.jsonl"
    answers.write_text("\n".join(json.dumps(r) for r in [
        {"id": examples[0]["id"], "prompt": "ignored: joined by id", "answer": "Green [s=7]"},
        {"prompt": "Add the numbers.\n\n2 and 3", "answer": "6 [s=1]"},  # joined by prompt
        {"prompt": "Only here?", "answer": "Yes [s=4]"}]) + "\n")
    settings = tmp_path / "gleaner.yaml"
    settings.write_text("compare:\n  max_failed_share: 1.0\n  parse_retries: 1\n")
    runner = CliRunner()
    with OpenAIStub(marker_judge) as stub:
        args = ["compare", "--run-id", "cmp-run", "--store", str(store_dir), "--responses",
                "original", "--responses", "teacher", "--responses", str(answers),
                "--judge-base-url", stub.base_url, "--judge-model", "gpt-4", "--json",
                "--config", str(settings)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        first = list(stub.requests)
        again = runner.invoke(app, args)  # same run: every grade is in its parts
        assert again.exit_code == 0, again.output
        assert len(stub.requests) == len(first)
        other = runner.invoke(app, [*args[:2], "cmp-other", *args[3:]])
        assert other.exit_code != 0  # no ingest in that run: refused before anything is sent
    # colour: Blue 3, Red 7, Green 7 -> 2 pairs, 1 tie; numbers: 5 (original and teacher's
    # "Five" differ) 9, 9, 1 -> 2 pairs, 1 tie; "Say nothing." has one response (teacher failed);
    # "Only here?" has one response.
    assert (summary["prompts"], summary["prompts_judged"], summary["responses"]) == (4, 2, 6)
    assert summary["prompts_single_response"] == 2 and summary["unavailable"] == {"teacher": 1}
    assert (summary["scored"], summary["failed"], summary["pairs"], summary["ties_skipped"]) == (
        6, 0, 4, 2)
    assert len(first) == 1 + 6  # the probe, then one call per response
    expected = grading_messages("Add the numbers.\n\n2 and 3", "6 [s=1]")
    assert any(r["messages"] == expected for r in first)
    assert all(r["temperature"] == 0.0 and r["model"] == "gpt-4" for r in first[1:])
    store = Store(str(store_dir))
    pairs = store.read_stage("cmp-run", "compare/pairs").to_pylist()
    assert {(p["chosen"], p["rejected"], p["margin"]) for p in pairs} == {
        ("Red [s=7]", "Blue [s=3]", 4.0), ("Green [s=7]", "Blue [s=3]", 4.0),
        ("5 [s=9]", "6 [s=1]", 8.0), ("Five [s=9]", "6 [s=1]", 8.0)}
    assert {tuple(p["chosen_sources"]) for p in pairs} == {("teacher",), (str(answers),),
                                                          ("original",)}


def test_unparseable_grades_are_failed_rows_with_their_raw_text(prefect_api, ray_local,
                                                                tmp_path: Path) -> None:
    from gleaner.config import GleanerConfig
    from gleaner.flows.compare_flow import compare_flow
    from gleaner.store import Store

    store_dir = tmp_path / "store"
    write_run(store_dir, "bad-run")
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"prompt": "Say nothing.", "answer": "Silence [s=2]"}) + "\n")
    with OpenAIStub(marker_judge) as stub:
        config = GleanerConfig().with_overrides({
            "store.url": str(store_dir), "compare.endpoint.base_url": stub.base_url,
            "compare.max_failed_share": 1.0, "compare.parse_retries": 2})
        summary = compare_flow(run_id="bad-run", config=config,
                               responses=["original", str(answers)])
        asked = [r for r in stub.requests if "[s=x]" in json.dumps(r)]
    assert len(asked) == 3  # asked again parse_retries times
    assert (summary["responses"], summary["scored"], summary["failed"]) == (2, 1, 1)
    assert summary["pairs"] == 0 and summary["failures"] == {"parse": 1}
    grades = Store(str(store_dir)).read_stage("bad-run", "compare/judge").to_pylist()
    failed = [g for g in grades if g["status"] == "failed"]
    assert failed[0]["raw"] == "This answer is fine, but I will not give a number."
    assert "no rating [[1-10]]" in failed[0]["error"] and failed[0]["error_kind"] == "parse"
