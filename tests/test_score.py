"""DEITA scorers: the expected-score arithmetic, the endpoint back end on a loopback server,
the per-turn evol score, and the HF back end on the real SmolLM2 GGUF."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from gleaner.config import EndpointConfig, ScoreConfig
from gleaner.schema import Example, Turn
from gleaner.tasks.deita.score import (
    COMPLEXITY_TEMPLATE,
    QUALITY_TEMPLATE,
    EndpointScorer,
    Scored,
    complexity_prompt,
    expected_from_logits,
    quality_prompt,
    score_rows,
    turn_prompts,
)
from tests.support.openai_server import OpenAIStub, Reply, request_text


def test_expected_score_on_known_logits():
    # Equal logits: the mean of 1..6.
    assert expected_from_logits([0.0] * 6) == pytest.approx(3.5)
    # All mass on "6" (others -inf, as when the endpoint omits them).
    assert expected_from_logits([-np.inf] * 5 + [2.0]) == pytest.approx(6.0)
    # A hand-computed case: softmax([ln1, ln1, ln2, 0-inf, ...]) = [.25, .25, .5, 0, 0, 0].
    z = [0.0, 0.0, math.log(2), -np.inf, -np.inf, -np.inf]
    assert expected_from_logits(z) == pytest.approx(0.25 * 1 + 0.25 * 2 + 0.5 * 3)
    # Shift invariance (softmax over the six only) and batching.
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 6)) * 3
    want = [(np.exp(r) / np.exp(r).sum() * np.arange(1, 7)).sum() for r in logits]
    np.testing.assert_allclose(expected_from_logits(logits + 100.0), want, rtol=1e-12)
    assert np.isnan(expected_from_logits([-np.inf] * 6))


def test_prompts_are_deitas_raw_text():
    assert complexity_prompt("Add 2 and 3.") == (
        "You are a helpful assistant. Please identify the complexity score of the following user "
        "query. \n##Query: Add 2 and 3.  \n##Complexity: "
    )
    assert quality_prompt("Q?", "A.") == (
        "You are a helpful assistant. Please identify the quality score of the Response "
        "corresponding to the Question. \n #Question#:\nQ?\n#Response#:\nA. \n##Quality: "
    )
    assert "{instruction}" in COMPLEXITY_TEMPLATE and "{output}" in QUALITY_TEMPLATE


class FixedScorer:
    """A scorer answering from a table (for the evol arithmetic; the real back ends are below)."""

    def __init__(self, name, table):
        self.name, self.table, self.seen = name, table, []

    def score(self, prompts):
        self.seen.extend(prompts)
        return [Scored(self.table[p]) if p in self.table else Scored(None, "boom") for p in prompts]


def test_multi_turn_evol_is_sum_of_products_and_failures_are_recorded():
    multi = Example("t", 0, "second question", output="second answer",
                    history=[Turn("user", "first question"), Turn("assistant", "first answer")])
    single = Example("t", 1, "solo", input="ctx", output="out")
    broken = Example("t", 2, "unscorable", output="x")
    rows = [e.to_row() for e in (multi, single, broken)]
    c = FixedScorer("c-model", {
        complexity_prompt("first question"): 2.0, complexity_prompt("second question"): 4.0,
        complexity_prompt("solo\n\nctx"): 3.0,
    })
    q = FixedScorer("q-model", {
        quality_prompt("first question", "first answer"): 5.0,
        quality_prompt("second question", "second answer"): 1.5,
        quality_prompt("solo\n\nctx", "out"): 2.0, quality_prompt("unscorable", "x"): 3.0,
    })
    c_prompts, q_prompts = turn_prompts(rows)
    table = score_rows(rows, c.score(c_prompts), q.score(q_prompts), c.name, q.name)
    assert [r["id"] for r in table] == [multi.id, single.id, broken.id]
    assert table[0]["turns"] == 2
    assert table[0]["evol"] == pytest.approx(2.0 * 5.0 + 4.0 * 1.5)
    assert table[0]["complexity_turns"] == [2.0, 4.0]
    assert table[1]["evol"] == pytest.approx(6.0) and table[1]["status"] == "ok"
    assert table[2]["status"] == "failed" and "complexity: boom" in table[2]["error"]
    assert table[2]["evol"] is None
    assert {r["complexity_model"] for r in table} == {"c-model"}


def digit_logprobs(body):
    """A scorer endpoint: score tokens with logprobs depending on the prompt."""
    text = request_text(body)
    if "UNSCORABLE" in text:
        return Reply(content="Hello", top_logprobs=[{"Hello": -0.1, " there": -2.5}])
    if "##Complexity" in text:
        top = {"3": math.log(0.5), "4": math.log(0.3), " 5": math.log(0.1), "\n": math.log(0.1)}
    else:
        top = {"6": math.log(0.6), "1": math.log(0.2), "foo": math.log(0.2)}
    return Reply(content=next(iter(top)), top_logprobs=[top])


def endpoint_scores(endpoint: EndpointConfig, prompts: list[str], top: int = 20):
    from gleaner.llm.client import LLMClient

    async def go():
        async with LLMClient(endpoint) as client:
            return await EndpointScorer(client, top_logprobs=top).ascore(prompts), client.usage

    return asyncio.run(go())


def test_endpoint_scorer_against_loopback_server():
    with OpenAIStub(digit_logprobs) as stub:
        endpoint = EndpointConfig(base_url=stub.base_url, model="deita-scorer", max_retries=1)
        results, usage = endpoint_scores(endpoint, [
            complexity_prompt("Explain entropy."),
            quality_prompt("Q", "A"),
            complexity_prompt("UNSCORABLE"),
        ], top=7)
        body = stub.requests[0]
    # Renormalised over 1..6 only: (3*.5 + 4*.3 + 5*.1) / .9 and (6*.6 + 1*.2) / .8.
    assert results[0].value == pytest.approx((1.5 + 1.2 + 0.5) / 0.9)
    assert results[1].value == pytest.approx((3.6 + 0.2) / 0.8)
    assert results[2].value is None and "1..6" in results[2].error
    # Raw-text completion, one token, temperature 0, top_logprobs requested.
    assert "messages" not in body and body["prompt"].startswith("You are a helpful assistant.")
    assert body["max_tokens"] == 1 and body["temperature"] == 0 and body["logprobs"] == 7
    assert usage.calls == 3 and all(r.attempts == 1 for r in results)


def test_endpoint_failure_is_recorded_not_dropped():
    with OpenAIStub(lambda body: Reply(status=400)) as stub:
        endpoint = EndpointConfig(base_url=stub.base_url, model="m", max_retries=0)
        rows = [Example("t", 0, "q", output="a").to_row()]
        c_prompts, q_prompts = turn_prompts(rows)
        c, _ = endpoint_scores(endpoint, c_prompts)
        q, _ = endpoint_scores(endpoint, q_prompts)
        table = score_rows(rows, c, q, "m", "m")
    assert table[0]["status"] == "failed" and "http_error" in table[0]["error"]
    assert table[0]["error_kind"] == "http_error" and table[0]["attempts"] == 2


def test_a_rejected_key_is_fatal_for_the_scorer():
    from gleaner.llm.client import LLMError

    with OpenAIStub(lambda body: Reply(status=401)) as stub:
        endpoint = EndpointConfig(base_url=stub.base_url, model="m", max_retries=0)
        with pytest.raises(LLMError, match="rejected the API key"):
            endpoint_scores(endpoint, [complexity_prompt("q")])


@pytest.mark.slow  # loads SmolLM2 from its GGUF (~20 s), once for the scorer and the embedding
def test_hf_scorer_and_last_hidden_state_embeddings_on_smollm2_gguf():
    """The real offline model: two examples, values in [1, 6], batching does not change them.
    Then DEITA's embedding from the same loaded model (one GGUF load in the process, not one
    per test): the last token's final hidden state; left padding must not change it."""
    from gleaner.tasks.deita.score import HFScorer

    scorer = HFScorer(None, device="cpu", batch_size=4)
    assert scorer.token_ids == [scorer.tokenizer.convert_tokens_to_ids(d) for d in "123456"]
    prompts = [
        complexity_prompt("Write a haiku about autumn."),
        quality_prompt("What is 2+2?", "2+2 equals 4, because adding two and two gives four."),
    ]
    batched = [s.value for s in scorer.score(prompts)]
    alone = [scorer.score([p])[0].value for p in prompts]
    assert all(1.0 <= v <= 6.0 for v in batched)
    np.testing.assert_allclose(batched, alone, atol=1e-4)  # left padding handled
    from gleaner.tasks.deita.stages import HFScoreWorker

    worker = HFScoreWorker(ScoreConfig())
    rows = [Example("t", 0, "Name a prime.", output="7").to_row()]
    import pyarrow as pa

    from gleaner.schema import EXAMPLE_SCHEMA

    row = worker.process(pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)).to_pylist()[0]
    assert row["status"] == "ok" and 1.0 <= row["evol"] <= 36.0
    assert "SmolLM2" in row["complexity_model"]

    from gleaner.tasks.deita.embed import Encoder
    from tests.test_embed import TEXTS

    lm = Encoder(None, pooling="last", batch_size=3)
    assert lm.name.endswith("#last-hidden") and lm.dim == lm.model.config.hidden_size
    together = lm.encode(TEXTS[:3])
    alone = np.stack([lm.encode([t])[0] for t in TEXTS[:3]])
    np.testing.assert_allclose(together, alone, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(together[0], together[1])


def test_the_two_scorer_models_share_one_cap_on_requests_in_flight():
    """resources.concurrency is the batch's requests in flight: the complexity and the
    quality model are two clients of one server and count together, not twice."""
    import pyarrow as pa

    from gleaner.tasks.deita.stages import score_stage

    def slow(body):
        reply = digit_logprobs(body)
        reply.delay_s = 0.05
        return reply

    with OpenAIStub(slow) as stub:
        section = ScoreConfig(backend="endpoint", complexity_model="c-model",
                              quality_model="q-model",
                              endpoint=EndpointConfig(base_url=stub.base_url, model="c-model"),
                              resources={"concurrency": 3})
        rows = [Example("t", i, f"question {i}", output=f"answer {i}").to_row() for i in range(12)]
        table = score_stage(section).open().process(pa.Table.from_pylist(rows))
        models = sorted({r["model"] for r in stub.requests})
    assert table.num_rows == 12 and set(table.column("status").to_pylist()) == {"ok"}
    assert models == ["c-model", "q-model"] and stub.count() == 24
    assert stub.peak_inflight == 3
