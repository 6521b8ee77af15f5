"""``gleaner mt-bench``: one model on MT-Bench, graded the way FastChat grades it."""

from __future__ import annotations

from pathlib import Path

import typer

from gleaner.flows.cli_app import (
    ConfigOption,
    JsonOption,
    StoreOption,
    app,
    build_config,
    emit,
    run_or_fail,
)


@app.command("mt-bench")
def mt_bench(
    run_id: str = typer.Option(..., "--run-id", help="The run to record into (and whose "
                               "fine-tuned models are named)."),
    model: str = typer.Option(..., "--model", help="A trained name of the run, base, a folder "
                              "or an HF id."),
    store: str | None = StoreOption,
    judge_base_url: str | None = typer.Option(None, "--judge-base-url"),
    judge_model: str | None = typer.Option(None, "--judge-model", help="Default gpt-4."),
    test_sets_dir: str | None = typer.Option(None, "--test-sets-dir", "--eval-sets-dir"),
    question_ids: list[int] | None = typer.Option(None, "--question-id", help="Repeatable."),
    per_category: int | None = typer.Option(None, "--per-category", min=1),
    max_tokens: int | None = typer.Option(None, "--max-tokens", "--max-new-tokens", min=1,
                                          help="Token cap of each answer."),
    config_file: Path | None = ConfigOption,
    as_json: bool = JsonOption,
) -> None:
    """Two-turn answers, single-answer grades 1-10 (references for math, reasoning, coding)."""
    config = build_config(config_file, **{
        "store.url": store, "evaluate.endpoint.base_url": judge_base_url,
        "evaluate.endpoint.model": judge_model, "evaluate.test_sets_dir": test_sets_dir,
        "mt_bench.question_ids": question_ids or None, "mt_bench.per_category": per_category,
        "mt_bench.answers.max_tokens": max_tokens})
    from gleaner.flows.mt_bench_flow import mt_bench_flow
    from gleaner.runtime import execution_environment
    from gleaner.tasks.mtbench.run import markdown

    def run() -> dict:
        with execution_environment(config):
            return mt_bench_flow(run_id=run_id, config=config, model=model)

    summary = run_or_fail(run)
    emit(summary, as_json, markdown(summary))
