"""rate_batch (plain function) against a real loopback server injecting faults."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gleaner.config import EndpointConfig
from gleaner.llm.client import LLMClient
from gleaner.tasks.rate.prompt import build_prompt
from gleaner.tasks.rate.raters import RateOptions
from gleaner.tasks.rate.stage import RATING_SCHEMA, rate_batch
from tests.support.faults import FaultyRater, examples, stable_score
from tests.support.openai_server import OpenAIStub


def rows_for(keys) -> list[dict]:
    return [e.to_row() for e in examples(keys)]


def rate(stub: OpenAIStub, rows, mode="explain", concurrency=16, **endpoint):
    config = {"base_url": stub.base_url, "model": "stub-model", "timeout_s": 0.4,
              "max_retries": 2, **endpoint}

    async def go():
        async with LLMClient(EndpointConfig(**config), backoff_s=0.01,
                             concurrency=concurrency) as client:
            options = RateOptions(parse_retries=2)
            return await rate_batch(rows, client, build_prompt(), mode, options)

    return asyncio.run(go())


def test_with_20_percent_faults_every_example_ends_ok_or_failed_once() -> None:
    keys = [f"k{i}" for i in range(150)]
    rater = FaultyRater(
        rates={"429": 0.04, "500": 0.04, "hang": 0.04, "unparseable": 0.04, "broken_json": 0.04},
        seed=7, hang_s=0.8,
    )
    rows = rows_for(keys)
    with OpenAIStub(rater) as stub:
        table = rate(stub, rows)
    assert table.schema == RATING_SCHEMA
    ratings = table.to_pylist()
    by_id = {r["id"]: r for r in ratings}
    # none lost, none duplicated, order kept
    assert [r["id"] for r in ratings] == [row["id"] for row in rows]
    assert len(by_id) == len(rows)
    assert sum(rater.faults.values()) > 30  # the faults really happened
    key_of = {row["id"]: key for row, key in zip(rows, keys, strict=True)}
    for rating in ratings:
        key = key_of[rating["id"]]
        assert rating["status"] in ("ok", "failed")
        assert rating["attempts"] == rater.requests[key]  # every request accounted for
        if rating["status"] == "ok":
            assert rating["score"] == stable_score(key)
            assert rating["error"] is None and rating["raw"].startswith(f"{stable_score(key):g}")
        else:
            assert rating["score"] is None and rating["error"] and rating["error_kind"]
        # no example successfully rated twice (a success is an answer with a valid score)
        assert rater.successes[key] <= 1
        assert rater.successes[key] == (rating["status"] == "ok")
    assert sum(r["status"] == "ok" for r in ratings) >= 140


def test_parse_failures_are_retried_then_failed_with_the_raw_text() -> None:
    rater = FaultyRater(rates={"unparseable": 1.0})
    with OpenAIStub(rater) as stub:
        table = rate(stub, rows_for(["a", "b"]))
    for rating in table.to_pylist():
        assert rating["status"] == "failed" and rating["score"] is None
        assert rating["error_kind"] == "parse" and "after 3 answers" in rating["error"]
        assert rating["raw"].startswith("This response is fairly good")
        assert rating["attempts"] == 3
    assert rater.requests == {"a": 3, "b": 3}


def test_score_only_uses_one_token_and_the_expected_value_over_0_to_5() -> None:
    keys = [f"s{i}" for i in range(12)]
    rater = FaultyRater()
    with OpenAIStub(rater) as stub:
        table = rate(stub, rows_for(keys), mode="score-only")
        bodies = list(stub.requests)
    assert all(b["max_tokens"] == 1 and b["logprobs"] and b["top_logprobs"] == 20 for b in bodies)
    for key, rating in zip(keys, table.to_pylist(), strict=True):
        assert rating["status"] == "ok" and rating["mode"] == "score-only"
        assert rating["score"] == pytest.approx(stable_score(key))
        assert rating["completion_tokens"] == 1


def test_score_only_falls_back_to_explain_without_logprobs_and_says_so_once(caplog) -> None:
    keys = [f"f{i}" for i in range(6)]
    rater = FaultyRater(logprobs=False)
    with caplog.at_level(logging.WARNING, logger="gleaner.rate"), OpenAIStub(rater) as stub:
        table = rate(stub, rows_for(keys), mode="score-only", concurrency=1)
    ratings = table.to_pylist()
    assert all(r["status"] == "ok" and r["mode"] == "explain" for r in ratings)
    assert [r["score"] for r in ratings] == [stable_score(k) for k in keys]
    notes = [r for r in caplog.records if "no logprobs" in r.getMessage()]
    assert len(notes) == 1
