"""Teacher regeneration on real data (200 Alpaca examples, LIMA's 29 conversations) with a
loopback teacher: every example answered or failed, originals untouched, the cache, --keep,
and the two answer sets judged by ``gleaner evaluate --answers-a/--answers-b``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.flows.evaluate_flow import evaluate_flow
from gleaner.flows.generate_flow import run_regenerate
from gleaner.schema import EXAMPLE_SCHEMA, Turn, example_id
from gleaner.store import Store
from gleaner.tasks.generate.regenerate import REGENERATE_SCHEMA, teacher_messages
from gleaner.tasks.ingest.ingest import run_ingest
from tests.support.openai_server import OpenAIStub, Reply


def digest(messages: list[dict]) -> int:
    return int(hashlib.sha256(json.dumps(messages).encode()).hexdigest(), 16)


class Teacher:
    """Answers from the messages; about 1 in 20 answered 400 (a row that fails), the judge's
    requests (Assistant 1/2) with a score line."""

    def __init__(self) -> None:
        self.seen: list[list[dict]] = []

    def __call__(self, body: dict) -> Reply:
        messages = body["messages"]
        text = messages[-1]["content"]
        if "[The Start of Assistant 1's Answer]" in text:
            return Reply("8 6\nThe first answer is more detailed.")
        if text == "Say OK.":
            return Reply("OK")
        self.seen.append(messages)
        if digest(messages) % 20 == 0:
            return Reply(status=400, error_message="injected: content policy")
        return Reply(f"Teacher answer ({len(messages)} turns): {text[:40]}")


@pytest.fixture(scope="module")
def sources(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("sources")
    alpaca = json.loads((shared_data / "alpaca/alpaca_random_9k.json").read_text())[:200]
    lima = [r for r in json.loads((shared_data / "lima/lima.json").read_text())
            if r.get("history")]
    assert len(lima) == 29
    (folder / "alpaca_200.json").write_text(json.dumps(alpaca))
    (folder / "lima_conversations.json").write_text(json.dumps(lima))
    return [str(folder / "alpaca_200.json"), str(folder / "lima_conversations.json")]


def config_for(store: Store, stub: OpenAIStub, **overrides: object) -> GleanerConfig:
    return GleanerConfig().with_overrides({
        "store.url": store.url, "regenerate.endpoint.base_url": stub.base_url,
        "regenerate.endpoint.model": "teacher-model", "regenerate.endpoint.max_retries": 0,
        "regenerate.resources.batch_size": 64, "regenerate.max_failed_share": 0.2,
        "regenerate.resources.retry_delay_s": 0, **overrides})


def test_regeneration_of_real_examples_and_conversations(
        prefect_api: str, ray_local: None, tmp_path: Path, sources: list[str]) -> None:
    store = Store(str(tmp_path / "store"))
    ingested = run_ingest(sources, store, "pool", GleanerConfig().with_overrides(
        {"store.url": store.url}))
    assert ingested["kept"] == 229
    before = store.read_stage("pool", layout.INGEST, schema=EXAMPLE_SCHEMA).to_pylist()
    teacher = Teacher()
    with OpenAIStub(teacher) as stub:
        config = config_for(store, stub)
        summary = run_regenerate(config, "pool", into="pool-teacher",
                                 answers_out=str(tmp_path / "answers"))
        rows = {r["id"]: r for r in store.read_stage(
            "pool", layout.REGENERATE, schema=REGENERATE_SCHEMA).to_pylist()}
        examples = {e["id"]: e for e in before}
        # every example: its teacher answer, or a failed row with the cause
        assert set(rows) == set(examples) and len(rows) == 229
        failed = {i for i, r in rows.items() if r["status"] == "failed"}
        assert 0 < len(failed) < 30 and summary["failed"] == len(failed)
        assert summary["failures"] == {"http_error": len(failed)}
        for example_id_, row in rows.items():
            example = examples[example_id_]
            messages = teacher_messages(example)
            assert row["output_original"] == example["output"]
            assert row["teacher_model"] == "teacher-model"
            if row["status"] == "failed":
                assert "content policy" in row["error"] and row["output_teacher"] is None
                continue
            assert row["output_teacher"] == (  # as the teacher said it, without edge blanks
                f"Teacher answer ({len(messages)} turns): {messages[-1]['content'][:40]}".strip())
            assert row["completion_tokens"] > 0 and row["prompt_tokens"] > 0
        # a conversation is asked with its earlier turns, as chat messages
        conversations = [e for e in before if len(e["conversation"]) > 2]
        assert len(conversations) == 29
        for example in conversations:
            assert example["conversation"][:-1] in teacher.seen
        # the originals are untouched
        assert store.read_stage("pool", layout.INGEST, schema=EXAMPLE_SCHEMA).to_pylist() == \
            before

        # --keep teacher: a run of the teacher's examples; failed ones quarantined, counted
        trained = store.read_stage("pool-teacher", layout.INGEST, schema=EXAMPLE_SCHEMA)
        assert trained.num_rows == 229 - len(failed)
        assert summary["into"]["quarantined"] == len(failed)
        assert summary["into"]["reasons"] == {"teacher_failed": len(failed)}
        for example in trained.to_pylist():
            meta = json.loads(example["metadata"])["regenerate"]
            original = examples[meta["original_id"]]
            assert example["output"] == rows[meta["original_id"]]["output_teacher"]
            assert meta["output_original"] == original["output"]
            assert example["conversation"][:-1] == original["conversation"][:-1]
            history = [Turn(t["role"], t["content"]) for t in example["conversation"][:-2]]
            assert example["id"] == example_id(example["instruction"], example["input"],
                                               example["output"], history)

        # a second run over the same examples: the teacher's answers come from the cache
        run_ingest(sources, store, "again", GleanerConfig().with_overrides(
            {"store.url": store.url}))
        stub.reset()
        second = run_regenerate(config.with_overrides({"regenerate.keep": "both"}), "again",
                                into="again-both")
        assert second["cached"] == 229 - len(failed)
        assert stub.count() == 1 + len(failed)  # the probe, and the failed ones asked again
        assert second["into"]["kept"] == 229 + (229 - len(failed))  # both: two per answered

        # the two answer sets, judged against each other in one command
        answers = summary["answers"]
        assert answers["rows"] == 229 - len(failed)
        judge = config.with_overrides({"evaluate.endpoint.base_url": stub.base_url,
                                       "evaluate.endpoint.model": "judge-model"})
        verdict = evaluate_flow(run_id="teacher-vs-original", config=judge,
                                answers_a=answers["teacher"], answers_b=answers["original"])
    assert verdict["join_key"] == "id" and verdict["matched"] == answers["rows"]
    overall = verdict["overall"]
    assert overall["win"] + overall["tie"] + overall["lose"] + overall["failed"] == \
        answers["rows"]
    # the judge always prefers Assistant 1: each order gives A one win and one loss -> ties
    assert overall["tie"] == answers["rows"]
