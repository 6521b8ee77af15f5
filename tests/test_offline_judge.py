"""The judge gleaner starts itself (llama.cpp + SmolLM2) gets the offline settings on both paths
(the curate flow's shared server, the evaluate flow's own), and its verdicts parse.

The rule is the judge's offline role (``with_offline(config, server, "judge")``): the
offline token cap and llama.cpp's GBNF grammar for the score line. The grammar reaches
the wire only when it is on: checked on a loopback stub that records request bodies, and
against the real llama.cpp server, whose constrained reviews must all parse.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from gleaner.config import GleanerConfig
from gleaner.llm.offline import offline_endpoints, with_offline
from gleaner.tasks.evaluate.judge import SCORE_LINE_GRAMMAR, Pair, parse_scores
from gleaner.tasks.evaluate.stage import make_judge
from tests.support.openai_server import OpenAIStub, Reply

SCORE_LINE = re.compile(r"(10|[1-9]) (10|[1-9])")

# Real questions (Vicuna's first ones) with a good and a poor answer each, in both orders.
PAIRS = [
    Pair("vicuna", "1", "How can I improve my time management skills?",
         "Set clear goals, prioritise tasks by importance, block time in a calendar, and review "
         "each week what worked.", "Time is a river."),
    Pair("vicuna", "2", "What are the most effective ways to deal with stress?",
         "Regular exercise, enough sleep, talking to people you trust and breaking big problems "
         "into small steps all reduce stress.", "Stress is bad."),
    Pair("vicuna", "3", "What are the main differences between Python and JavaScript?",
         "I do not know.", "Python is mostly used on servers and for data work, JavaScript runs "
         "in browsers; Python uses indentation for blocks, JavaScript uses braces."),
]


def with_offline_judge(cfg: GleanerConfig, base_url: str, model: str) -> GleanerConfig:
    server = SimpleNamespace(base_url=base_url, model=model, state_path="/nonexistent.json")
    return with_offline(cfg, server, "judge")


def config(**overrides: object) -> GleanerConfig:
    return GleanerConfig().with_overrides(dict(overrides))


def test_the_offline_rule_sets_the_token_cap_and_the_grammar() -> None:
    base = config()
    live = with_offline_judge(base, "http://127.0.0.1:1/v1", "smollm2-135m-instruct")
    assert live.evaluate.endpoint.base_url == "http://127.0.0.1:1/v1"
    assert live.evaluate.max_tokens == base.evaluate.offline_max_tokens == 48
    assert live.evaluate.grammar is True
    assert live.evaluate.resources.concurrency == 2
    # A user who turned the grammar off keeps it off, offline too.
    off = with_offline_judge(config(**{"evaluate.grammar": False}), "http://x/v1", "m")
    assert off.evaluate.grammar is False
    assert off.evaluate.max_tokens == 48


def test_grammar_is_in_the_request_body_only_when_on() -> None:
    def prefers_a(body: dict) -> Reply:
        user = body["messages"][1]["content"]
        a_first = user.index(PAIRS[0].answer_a) < user.index(PAIRS[0].answer_b)
        return Reply("8 6\nThe first." if a_first else "6 8\nThe second.")

    with OpenAIStub(prefers_a) as stub:
        url = {"evaluate.endpoint.base_url": stub.base_url, "evaluate.endpoint.max_retries": 0}

        def bodies(cfg: GleanerConfig) -> list[dict]:
            stub.reset()
            [result] = make_judge(cfg).judge(PAIRS[:1])
            assert result.verdict == "win"
            return list(stub.requests)

        configured = bodies(config(**url))  # a configured endpoint (OpenAI): never by default
        assert len(configured) == 2
        assert all("grammar" not in b and b["max_tokens"] == 1024 for b in configured)
        forced = bodies(config(**url, **{"evaluate.grammar": True}))  # own llama.cpp
        assert all(b["grammar"] == SCORE_LINE_GRAMMAR for b in forced)
        assert all(b["max_tokens"] == 1024 for b in forced)
        offline = bodies(with_offline_judge(config(), stub.base_url, "smollm2"))
        assert all(b["grammar"] == SCORE_LINE_GRAMMAR and b["max_tokens"] == 48 for b in offline)
        off = bodies(with_offline_judge(config(**{"evaluate.grammar": False}),
                                        stub.base_url, "smollm2"))
        assert all("grammar" not in b for b in off)


def assert_offline_reviews_parse(cfg: GleanerConfig) -> None:
    """Real SmolLM2 reviews under the grammar: every order parses at the first attempt."""
    judge = make_judge(cfg)
    assert judge.max_tokens == 48 and judge.grammar == SCORE_LINE_GRAMMAR
    results = judge.judge(PAIRS)
    for result in results:
        for review in (result.a_first, result.b_first):
            assert review.error is None, review.raw
            assert review.attempts == 1
            assert SCORE_LINE.fullmatch(review.raw.splitlines()[0]), review.raw
            assert parse_scores(review.raw) == review.scores
            assert 1 <= review.completion_tokens <= 48
        assert result.verdict in ("win", "tie", "lose")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_curate_flow_offline_judge_gets_offline_settings_and_parses() -> None:
    """curate's one llama.cpp server for rater and judge: the judge still gets the offline rule."""
    with offline_endpoints(config(), "rater", "judge") as live:
        assert live.evaluate.endpoint.base_url == live.rate.endpoint.base_url
        assert live.evaluate.endpoint.model == "smollm2-135m-instruct"
        # a base_url now: used as it is, no new server
        with offline_endpoints(live, "judge") as judging:
            assert judging is live
        assert_offline_reviews_parse(live)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_evaluate_flow_offline_judge_gets_offline_settings_and_parses() -> None:
    """The evaluate flow alone, no judge configured: it starts the server under the same rule."""
    with offline_endpoints(config(), "judge") as judging:
        assert judging.evaluate.endpoint.base_url.startswith("http://127.0.0.1:")
        assert_offline_reviews_parse(judging)
