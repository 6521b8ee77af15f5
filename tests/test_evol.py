"""DEITA's EVOL: the rewriter and rank-and-score prompts, the strict `[k] Score: n` parse (real
answers read, malformed ones failed with their raw text), and the stage on the engine against a
loopback rewriter (exact prompts, rows cached, items with their lineage)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gleaner.tasks.evol import prompts
from gleaner.tasks.evol.parse import parse_scores
from tests.support.openai_server import OpenAIStub, Reply


# ---- parsing -------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, n, scores", [
    ("[1] Score: 1\n[2] Score: 2\n[3] Score: 3\n[4] Score: 4\n[5] Score: 5", 5, [1, 2, 3, 4, 5]),
    (" [1] Score: 2\n [2] Score: 3\n [3] Score: 3\n [4] Score: 5\n [5] Score: 6\n", 5,
     [2, 3, 3, 5, 6]),
    ("Sure! Here is my ranking:\n\n[Response 1] Score: 4\n[Response 2] Score: 2\n"
     "[Response 3] Score: 4\n\nResponse 3 adds the most detail.", 3, [4, 2, 4]),
    ("[2] score: 3\n[1] SCORE:1\n[3] Score : 4", 3, [1, 3, 4]),  # any order, any case
    ("[1] Score: 2.0\n[2] Score: 3", 2, [2, 3]),
    ("[1] Score: 2\n[1] Score: 2\n[2] Score: 3", 2, [2, 3]),  # a repeated, consistent line
])
def test_real_looking_rank_and_score_answers(answer: str, n: int, scores: list[int]) -> None:
    assert parse_scores(answer, n).scores == scores


@pytest.mark.parametrize("answer, n, reason", [
    ("I think the third question is the hardest.", 3, "no '[k] Score: n' line"),
    ("[1] Score: 1\n[2] Score: 2\n[4] Score: 3", 3, "version [4], but there are 3"),
    ("[1] Score: 1\n[2] Score: 2", 3, "version(s) [3]"),
    ("[1] Score: 1\n[2] Score: 7\n[3] Score: 2", 3, "not a whole number in 1-4"),
    ("[1] Score: 0\n[2] Score: 1", 2, "not a whole number in 1-3"),
    ("[1] Score: 2.5\n[2] Score: 1", 2, "not a whole number"),
    ("[1] Score: 2\n[1] Score: 3\n[2] Score: 1", 2, "two scores (2, 3)"),
    ("", 2, "no '[k] Score: n' line"),
])
def test_malformed_answers_are_failures_with_a_reason(answer: str, n: int, reason: str) -> None:
    parsed = parse_scores(answer, n)
    assert parsed.scores is None and reason in parsed.reason


# ---- prompts -------------------------------------------------------------------------------
def test_rank_prompts_are_deitas() -> None:
    complexity = prompts.rank_prompt("complexity", [f"q{i}" for i in range(1, 6)])
    assert complexity == (
        "Ranking the following questions according to the difficulty and complexity. Score 1-5. "
        "You can give a score of 6 if the question is too complex for you to answer it. You "
        "should respond with the format:\n [1] Score: 1\n [2] Score: 2\n"
        "[1] q1\n[2] q2\n[3] q3\n[4] q4\n[5] q5")
    quality = prompts.rank_prompt("quality", ["r1", "r2"], "Give three tips.")
    assert quality.startswith("Rank the following responses provided by different AI assistants "
                              "to the user's question according to the quality of their response."
                              " Score each response from 1 to 2, with 3 reserved for responses")
    assert quality.endswith("[Response 1] Score:\n[Response 2] Score:\n#Question#: Give three "
                            "tips.\n#Response List#:\n[Response 1] r1\n[Response 2] r2")


def test_rewriter_prompts_and_methods() -> None:
    text = prompts.rewrite_prompt("complexity", "constraints", "Name a colour.")
    assert text.startswith("I want you act as a Prompt Rewriter.\n")
    assert "using the following method:\nPlease add one more constraints/requirements into " \
           "#Given Prompt#\n" in text
    assert "can only add 10 to 20 words into #Given Prompt#." in text
    assert text.endswith("#Given Prompt#:\nName a colour.\n#Rewritten Prompt#:\n")
    quality = prompts.rewrite_prompt("quality", "details", "Blue.", "Name a colour.")
    assert quality.startswith("I want you to act as a Response Rewriter\n")
    assert "Please increase the detail level of Response\n" in quality
    assert quality.endswith("#Given Prompt#:\nName a colour.\n#Given Response#:\nBlue.\n"
                            "#Rewritten Response#:\n")
    assert sorted(prompts.round_methods("complexity", "seed-a", 4)) == sorted(
        prompts.COMPLEXITY_METHODS)  # four rounds: each in-depth method once
    used = [m for i in range(50) for m in prompts.round_methods("quality", f"s{i}", 4)]
    assert set(used) == set(prompts.QUALITY_METHODS)  # all five over a pool
    assert prompts.round_methods("quality", "s1", 4) == prompts.round_methods("quality", "s1", 4)
    assert prompts.clean_rewrite("#Rewritten Prompt#:\n Name two colours. ") == "Name two colours."
    grammar = prompts.rank_grammar("quality", 2)
    assert grammar == ('root ::= "[Response 1] Score: " score "\\n" "[Response 2] Score: " '
                       'score "\\n"\nscore ::= [1-3]\n')


# ---- the stage against a loopback rewriter -------------------------------------------------
GIVEN = re.compile(r"#Given Prompt#:\n(.*)\n#Rewritten Prompt#:\n$", re.S)


def rewriter(body: dict) -> Reply:
    text = body["messages"][-1]["content"]
    given = GIVEN.search(text)
    if given:  # a rewrite: one more clause each round
        return Reply(f"#Rewritten Prompt#: {given.group(1)} (harder)", prompt_tokens=100,
                     completion_tokens=10)
    if "Ranking the following questions" in text:
        if "Say nothing" in text:
            return Reply("They are all equally hard.")
        n = len(re.findall(r"^\[\d+\] ", text, re.M))
        return Reply("\n".join(f"[{k}] Score: {k}" for k in range(1, n + 1)))
    return Reply("OK")  # the probe


def test_cli_evol_complexity_rows_items_and_cache(prefect_api, ray_local, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gleaner.flows.cli import app
    from gleaner.schema import Example, examples_to_table
    from gleaner.store import Store
    from gleaner.tasks.evol.items import item_id

    store = Store(str(tmp_path / "store"))
    seeds = [Example("pool", 0, "Name a colour.", "", "Blue."),
             Example("pool", 1, "Add the numbers.", "2 and 3", "5"),
             Example("pool", 2, "Say nothing.", "", "...")]
    store.write_part("evol-run", "ingest", 0, examples_to_table(seeds))
    settings = tmp_path / "gleaner.yaml"
    settings.write_text("evol:\n  max_failed_share: 1.0\n  parse_retries: 1\n")
    args = ["evol", "complexity", "--run-id", "evol-run", "--rounds", "2", "--store", store.url,
            "--base-url", "PLACEHOLDER", "--model", "gpt-3.5-turbo", "--json", "--config",
            str(settings)]
    runner = CliRunner()
    with OpenAIStub(rewriter) as stub:
        args[args.index("PLACEHOLDER")] = stub.base_url
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        sent = list(stub.requests)
        again = runner.invoke(app, args)
        assert again.exit_code == 0, again.output
        assert len(stub.requests) == len(sent)  # a rerun sends nothing
    # 3 seeds x 2 rewrites + 2 rankings + 2 for the unreadable one, and the probe
    assert len(sent) == 1 + 3 * 2 + 2 + 2
    assert (summary["seeds"], summary["chains_ok"], summary["chains_failed"]) == (3, 2, 1)
    assert summary["items"] == 6 and summary["failures"] == {"parse": 1}
    first = seeds[1]
    methods = prompts.round_methods("complexity", first.id, 2)
    question = "Add the numbers.\n\n2 and 3"
    expected = prompts.rewrite_prompt("complexity", methods[0], question)
    assert any(r["messages"] == [{"role": "user", "content": expected}] for r in sent)
    second = prompts.rewrite_prompt("complexity", methods[1], f"{question} (harder)")
    assert any(r["messages"][-1]["content"] == second for r in sent)
    ranking = prompts.rank_prompt("complexity", [question, f"{question} (harder)",
                                                 f"{question} (harder) (harder)"])
    assert any(r["messages"][-1]["content"] == ranking and r["temperature"] == 0.0 for r in sent)
    assert all(r["temperature"] == 0.7 for r in sent if "Rewriter" in json.dumps(r))
    chains = {r["id"]: r for r in store.read_stage("evol-run", "evol/complexity").to_pylist()}
    failed = chains[seeds[2].id]
    assert failed["status"] == "failed" and failed["raw"] == "They are all equally hard."
    assert failed["error"].startswith("parse failure after 2 answers: rank-and-score answer "
                                      "unreadable") and len(failed["versions"]) == 3
    ok = chains[first.id]
    assert ok["scores"] == [1, 2, 3] and ok["methods"] == ["seed", *methods]
    items = [i for i in store.read_stage("evol-run", "evol/complexity-items").to_pylist()
             if i["seed_id"] == first.id]
    assert [(i["round"], i["score"], i["text"]) for i in sorted(items, key=lambda i: i["round"])
            ] == [(0, 1, question), (1, 2, f"{question} (harder)"),
                  (2, 3, f"{question} (harder) (harder)")]
    by_round = {i["round"]: i for i in items}
    assert by_round[0]["parent_id"] is None and by_round[0]["method"] == "seed"
    assert by_round[2]["parent_id"] == by_round[1]["id"] == item_id(first.id, "complexity", 1)


def test_offline_server_settings_for_the_grader_and_the_rewriter() -> None:
    """The local SmolLM2 server's rules: grammars on, short answers, two requests in flight;
    an explicit `false` for the grammar stays false."""
    from types import SimpleNamespace

    from gleaner.config import GleanerConfig
    from gleaner.llm.offline import with_offline

    def with_offline_grader(config, server):
        return with_offline(config, server, "grader")

    def with_offline_rewriter(config, server):
        return with_offline(config, server, "rewriter")

    server = SimpleNamespace(base_url="http://127.0.0.1:9/v1", model="smollm2",
                             state_path="/tmp/state.json")
    live = with_offline_rewriter(with_offline_grader(GleanerConfig(), server), server)
    assert live.compare.endpoint.base_url == live.evol.endpoint.base_url == server.base_url
    assert (live.compare.grammar, live.compare.max_tokens) == (True, 16)
    assert (live.evol.score.grammar, live.evol.max_tokens) == (True, 192)
    assert live.compare.resources.concurrency == live.evol.resources.concurrency == 2
    assert live.evol.endpoint.local_server == "/tmp/state.json"
    off = GleanerConfig().with_overrides({"compare.grammar": False, "evol.score.grammar": False})
    assert with_offline_grader(off, server).compare.grammar is False
    assert with_offline_rewriter(off, server).evol.score.grammar is False
