"""Self-instruct end to end against a loopback OpenAI-compatible server: counts per filter
reason, the pool's ROUGE-L property, resume after kill -9, plan, fatal and failed requests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from rouge_score import rouge_scorer

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.engine import BatchUnavailable, FatalStageError, PlanMismatch
from gleaner.schema import EXAMPLE_SCHEMA, example_id
from gleaner.store import Store
from gleaner.tasks.generate.as_ingest import IngestOwned
from gleaner.tasks.generate.seeds import load_seed_tasks
from gleaner.tasks.generate.selfinstruct import kept_instructions, run_self_instruct
from tests.support.openai_server import OpenAIStub, Reply, request_text
from tests.support.selfinstruct_stub import EXPECTED, GrowingResponder, ScriptedResponder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def seeds(shared_data: Path) -> str:
    return str(shared_data / "alpaca_seed/seed_tasks.jsonl")


@pytest.fixture(scope="module")
def alpaca_instructions(shared_data: Path) -> list[str]:
    rows = json.loads((shared_data / "alpaca/alpaca_random_9k.json").read_text())
    return [r["instruction"] for r in rows]


def config_for(store: Store, stub: OpenAIStub, **overrides: object) -> GleanerConfig:
    return GleanerConfig().with_overrides({
        "store.url": store.url, "generate.endpoint.base_url": stub.base_url,
        "generate.endpoint.model": "stub-model", "generate.endpoint.max_retries": 0,
        "generate.resources.retry_delay_s": 0, **overrides})


def test_every_candidate_is_kept_or_filtered_with_its_reason(tmp_path: Path, seeds: str) -> None:
    store = Store(str(tmp_path / "store"))
    with OpenAIStub(ScriptedResponder()) as stub:
        config = config_for(store, stub, **{"generate.requests_per_round": 4,
                                            "generate.max_rounds": 1,
                                            "generate.max_failed_share": 0.5})
        summary = run_self_instruct(config, "s", seeds, count=100)
        sent = [b for b in stub.requests if request_text(b) != "Say OK."]
    assert summary["kept"] == EXPECTED["kept"]
    assert summary["filtered"] == EXPECTED["filtered"]
    assert summary["candidates"] == 17 and summary["parsed"] == 14
    assert summary["candidates"] == summary["kept"] + sum(summary["filtered"].values())
    assert (summary["prompts"], summary["prompts_failed"]) == (4, 1)
    assert summary["failures"] == {"http_error": 1}
    assert summary["requests"] == 5  # 4 prompts + the probe, each one HTTP request
    assert summary["prompt_tokens"] > 0 and summary["completion_tokens"] > 0
    assert summary["reached"] is False and summary["stop_reason"] == "max_rounds"
    # Alpaca's request: the completions route, its settings, 3 tasks shown, "4. Instruction:"
    assert len(sent) == 4
    for body in sent:
        assert (body["temperature"], body["top_p"], body["max_tokens"], body["stop"]) == (
            1.0, 1.0, 3072, ["\n20", "20."])
        assert body["prompt"].endswith("###\n4. Instruction:")
        assert body["prompt"].count("###\n") == 4
    assert len({body["seed"] for body in sent}) == 4  # one sampling seed per request
    # the failed request is a row with its cause
    parts = store.read_stage("s", layout.GENERATE).to_pylist()
    [failed] = [r for r in parts if r["status"] == "failed"]
    assert "this prompt is not allowed" in failed["error"] and failed["tasks"] == []
    # the kept tasks are the run's ingest: no seeds, ids are content hashes, sources say where
    examples = store.read_stage("s", layout.INGEST, schema=EXAMPLE_SCHEMA).to_pylist()
    assert len(examples) == 4 and summary["ingest"]["kept"] == 4
    seed_texts = {t.instruction for t in load_seed_tasks(seeds)}
    for example in examples:
        assert example["instruction"] not in seed_texts
        assert example["id"] == example_id(example["instruction"], example["input"],
                                           example["output"])
        assert example["source"] == "self-instruct:stub-model:round-00000"
        assert json.loads(example["metadata"])["generator"] == "alpaca-self-instruct"
    ingest = store.read_json(layout.summary_path(store, "s", layout.INGEST))
    assert ingest["made_by"] == "alpaca-self-instruct"
    assert ingest["read"] == ingest["kept"] + ingest["quarantined"] + ingest["duplicates"] == 4


def assert_rouge_below_threshold(kept: list[str], seeds: list[str]) -> None:
    """Checked with rouge-score itself: no kept instruction is within 0.7 of another or of a
    seed (the pool each one met)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for i, text in enumerate(kept):
        for other in seeds + kept[:i]:
            assert scorer.score(other, text)["rougeL"].fmeasure < 0.7, (text, other)


def test_kept_instructions_are_all_below_rouge_l_07_of_each_other_and_the_seeds(
        tmp_path: Path, seeds: str, alpaca_instructions: list[str]) -> None:
    store = Store(str(tmp_path / "store"))
    # real generated instructions, each also offered once more: many near duplicates
    pool = alpaca_instructions[:300] * 2
    with OpenAIStub(GrowingResponder(pool)) as stub:
        summary = run_self_instruct(config_for(store, stub), "p", seeds, count=120)
    kept = kept_instructions(store, "p")
    assert summary["kept"] == len(kept) >= 120 and summary["reached"]
    assert summary["filtered"]["near_duplicate"] > 0
    assert_rouge_below_threshold(kept, [t.instruction for t in load_seed_tasks(seeds)])


def test_a_finished_run_reruns_without_requests_and_a_higher_count_continues(
        tmp_path: Path, seeds: str, alpaca_instructions: list[str]) -> None:
    store = Store(str(tmp_path / "store"))
    with OpenAIStub(GrowingResponder(alpaca_instructions)) as stub:
        config = config_for(store, stub)
        first = run_self_instruct(config, "r", seeds, count=40)
        stub.reset()
        again = run_self_instruct(config, "r", seeds, count=40)
        assert stub.count() == 0
        assert {k: again[k] for k in ("kept", "filtered", "rounds", "prompts")} == {
            k: first[k] for k in ("kept", "filtered", "rounds", "prompts")}
        more = run_self_instruct(config, "r", seeds, count=first["kept"] + 30)
        assert more["rounds_resumed"] == first["rounds"] and more["kept"] >= first["kept"] + 30
        assert kept_instructions(store, "r")[:first["kept"]] == [
            e["instruction"] for e in store.read_stage("r", layout.INGEST).to_pylist()
        ][:first["kept"]]
        with pytest.raises(PlanMismatch, match="settings.temperature"):
            run_self_instruct(config.with_overrides({"generate.temperature": 0.5}), "r", seeds,
                              count=1000)
        forced = run_self_instruct(config.with_overrides({"generate.force": True}), "r", seeds,
                                   count=10)
        assert forced["rounds_resumed"] == 0 and forced["kept"] < more["kept"]
        assert store.read_stage("r", layout.INGEST).num_rows == forced["kept"]


def test_a_run_does_not_overwrite_examples_ingested_from_files(
        tmp_path: Path, seeds: str) -> None:
    store = Store(str(tmp_path / "store"))
    store.write_json(layout.summary_path(store, "mine", layout.INGEST), {"read": 1})
    with OpenAIStub(ScriptedResponder()) as stub, pytest.raises(IngestOwned, match="ingest"):
        run_self_instruct(config_for(store, stub), "mine", seeds, count=5)
    assert stub.count() == 0


def test_a_rejected_key_stops_at_the_probe_and_a_dead_endpoint_writes_no_round(
        tmp_path: Path, seeds: str) -> None:
    store = Store(str(tmp_path / "store"))
    with OpenAIStub(lambda body: Reply(status=401, error_message="bad key")) as stub:
        with pytest.raises(FatalStageError, match="rejected the API key"):
            run_self_instruct(config_for(store, stub), "k", seeds, count=5)
        assert stub.count() == 1
    assert not store.has_stage("k", layout.GENERATE)

    def down(body: dict) -> Reply:
        return Reply("OK") if request_text(body) == "Say OK." else Reply(status=503)

    with OpenAIStub(down) as stub:
        config = config_for(store, stub, **{"generate.resources.retries": 1})
        with pytest.raises(BatchUnavailable, match="round 00000: all 5 requests failed"):
            run_self_instruct(config, "d", seeds, count=5)
        assert stub.count() == 1 + 2 * 5  # the probe, then the round asked twice
    assert not store.has_stage("d", layout.GENERATE)
    summary = store.read_json(layout.summary_path(store, "d", layout.GENERATE))
    assert summary["status"] == "stopped" and summary["rounds"] == 0


def kill_tree(process: subprocess.Popen) -> None:
    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def test_kill_9_mid_generation_then_rerun_reaches_the_same_pool(
        tmp_path: Path, seeds: str, alpaca_instructions: list[str]) -> None:
    store = Store(str(tmp_path / "store"))
    responder = GrowingResponder(alpaca_instructions[:2000], delay_s=0.2)
    count = 150
    with OpenAIStub(responder) as stub:
        command = [sys.executable, "-m", "tests.support.selfinstruct_run", "--store", store.url,
                   "--run-id", "killed", "--base-url", stub.base_url, "--seeds", seeds,
                   "--count", str(count), "--overrides",
                   json.dumps({"generate.requests_per_round": 3})]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "GLEANER_PROGRESS": "off"}
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while len(store.finished_parts("killed", layout.GENERATE)) < 2:
                assert process.poll() is None, process.communicate()[1].decode()[-3000:]
                assert time.monotonic() < deadline, "the run never got going"
                time.sleep(0.02)
        finally:
            kill_tree(process)
        done_at_kill = len(store.finished_parts("killed", layout.GENERATE))
        responder.delay_s = 0.0
        rerun = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
        resumed = json.loads(rerun.stdout.decode().strip().splitlines()[-1])
        clean = run_self_instruct(config_for(store, stub, **{
            "generate.requests_per_round": 3}), "clean", seeds, count=count)
    assert resumed["rounds_resumed"] == done_at_kill >= 2
    assert resumed["rounds"] > done_at_kill, "the run finished before it could be killed"
    assert kept_instructions(store, "killed") == kept_instructions(store, "clean")
    assert [r["id"] for r in store.read_stage("killed", layout.INGEST).to_pylist()] == [
        r["id"] for r in store.read_stage("clean", layout.INGEST).to_pylist()]
    for key in ("kept", "filtered", "candidates", "rounds", "prompts"):
        assert resumed[key] == clean[key], key


def test_sampling_draws_from_the_growing_pool_seeded_by_round(
        tmp_path: Path, seeds: str, alpaca_instructions: list[str]) -> None:
    store = Store(str(tmp_path / "store"))
    with OpenAIStub(GrowingResponder(alpaca_instructions)) as stub:
        config = config_for(store, stub, **{"generate.requests_per_round": 2})
        run_self_instruct(config, "g", seeds, count=150)
        shown = [b["prompt"] for b in stub.requests if request_text(b) != "Say OK."]
    parts = store.read_stage("g", layout.GENERATE).to_pylist()
    assert len(shown) == len(parts)
    assert all(len(r["context"]) == len(set(r["context"])) == 3 for r in parts)
    assert all(max(r["context"]) < 175 for r in parts if r["round"] == 0)  # only seeds yet
    later = [i for r in parts if r["round"] > 0 for i in r["context"]]
    assert max(later) >= 175  # generated tasks joined the pool and were shown
    kept = kept_instructions(store, "g")
    assert any(f"Instruction: {k}" in prompt for prompt in shown for k in kept)
    # the same seed and round draw the same tasks; another seed others
    stage_rng = [r["context"] for r in parts if r["round"] == 0]
    other = Store(str(tmp_path / "other"))
    with OpenAIStub(GrowingResponder(alpaca_instructions)) as stub:
        for name, seed in (("same", 0), ("seed1", 1)):
            config = config_for(other, stub, **{"generate.requests_per_round": 2,
                                                "generate.seed": seed,
                                                "generate.max_rounds": 1})
            run_self_instruct(config, name, seeds, count=150)
    rounds0 = {name: [r["context"] for r in other.read_stage(name, layout.GENERATE).to_pylist()]
               for name in ("same", "seed1")}
    assert rounds0["same"] == stage_rng and rounds0["seed1"] != stage_rng


def test_the_chat_route_sends_the_same_prompt_and_drops_an_echoed_number(
        tmp_path: Path, seeds: str, alpaca_instructions: list[str]) -> None:
    growing = GrowingResponder(alpaca_instructions)

    def chat_model(body: dict) -> Reply:  # a chat model repeats the "4. Instruction:" it saw
        reply = growing(body)
        return reply if request_text(body) == "Say OK." else Reply("4. Instruction:" +
                                                                   reply.content)

    store = Store(str(tmp_path / "store"))
    with OpenAIStub(chat_model) as stub:
        config = config_for(store, stub, **{"generate.route": "chat",
                                            "generate.max_rounds": 1})
        summary = run_self_instruct(config, "c", seeds, count=500)
        [body, *_] = [b for b in stub.requests if request_text(b) != "Say OK."]
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert body["messages"][0]["content"].endswith("###\n4. Instruction:")
    assert summary["filtered"].get("malformed", 0) == 0 and summary["parsed"] == 5 * 16
