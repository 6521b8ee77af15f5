"""Pairwise evaluation as a flow: answers from two models, judged in both orders, W/T/L reports.

``run_evaluate`` (generate, then judge) and ``run_evaluate_answers`` (judge two
existing answer files) are the plain callables; ``evaluate_flow`` is the
deployable entry point (``flows/evaluate_flow.py:evaluate_flow``) that also
publishes the report as Prefect artifacts.

Store layout (``<cmp>`` = ``<label_a>-vs-<label_b>``):

    runs/<id>/evaluate/answers/<label>/<test_set>.parquet     one model's answers
    runs/<id>/evaluate/<cmp>/judgements/<test_set>/part-*.parquet  both orders' scores
    runs/<id>/evaluate/<cmp>/report.md, wtl.png, summary.json, unmatched.json

Answers and judgements are checkpoints: a rerun reuses every test set the
store already holds (``evaluate.force`` redoes them). Judgements keep each
order's outcome, so the combination rule is applied when the report is made.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import math
import posixpath
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from gleaner.config import GleanerConfig, PriceConfig
from gleaner.runs import new_run_id, record_run
from gleaner.store import Store, part_name
from gleaner.tasks.evaluate.answers import join_answers, load_answers
from gleaner.tasks.evaluate.eval_sets import EvalPrompt, load_eval_set
from gleaner.tasks.evaluate.judge import JUDGEMENT_SCHEMA, SCORE_LINE_GRAMMAR, Judge, Pair
from gleaner.tasks.evaluate.verdicts import Tally, markdown_table, overall, stacked_bar_png, verdict

log = logging.getLogger("gleaner.evaluate")
ANSWER_SCHEMA = pa.schema([
    ("test_set", pa.string()), ("id", pa.string()), ("instruction", pa.string()),
    ("input", pa.string()), ("question", pa.string()), ("answer", pa.string()),
    ("model", pa.string()), ("model_version", pa.string()),
])


def label_of(reference: str) -> str:
    """A short, path-safe name for a model reference (``curated``, ``HuggingFaceTB/x`` ...)."""
    name = Path(reference.rstrip("/")).name if "/" in reference else reference
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower() or "model"


# ---- models ----------------------------------------------------------------------------------
def resolve_model(store: Store, run_id: str, config: GleanerConfig, reference: str,
                  cache_dir: Path) -> tuple[str, str]:
    """(folder or hub id, version) of a model of this run by name, ``base``, a folder, an HF id."""
    from gleaner.flows.finetune_flow import model_path, resolve_base_model

    if reference == "base":
        folder = resolve_base_model(config.finetune.base_model)
        return folder, model_version(folder)
    in_store = model_path(store, run_id, reference) if re.fullmatch(r"[a-z0-9_-]+", reference) \
        else None
    if in_store and store.exists(posixpath.join(in_store, "config.json")):
        # Every training rewrites metrics.json (loss curve, timings): it names this training.
        metrics = store.run_path(run_id, "finetune", reference, "metrics.json")
        version = hashlib.sha256(store.read_bytes(metrics)).hexdigest()[:16] \
            if store.exists(metrics) else model_version(in_store)
        if store.is_local:
            return in_store, version
        local = cache_dir / reference
        store.fs.get(in_store.rstrip("/") + "/", str(local), recursive=True)
        return str(local), version
    if Path(reference).exists():
        return reference, model_version(reference)
    if in_store and "/" not in reference:
        raise FileNotFoundError(
            f"model {reference!r}: not a trained model of run {run_id!r} "
            f"({store.uri(in_store)} is missing) nor a local folder")
    return reference, reference  # an HF hub id


def model_version(model_dir: str) -> str:
    """What identifies the weights: a folder's file names, sizes and times; else the hub id.

    Stored answers are reused only for the same version, so a retrained model
    (``finetune.force``) is asked again instead of being judged on stale answers.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        return model_dir
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def answers_path(store: Store, run_id: str, label: str, test_set: str) -> str:
    return store.run_path(run_id, "evaluate", "answers", label, f"{test_set}.parquet")


def generate_for(store: Store, run_id: str, config: GleanerConfig, reference: str,
                 model: tuple[str, str], prompts_by_set: dict[str, list[EvalPrompt]],
                 ) -> dict[str, pa.Table]:
    """One model's answers per test set, generated only where the store has none yet."""
    from gleaner.tasks.evaluate.generation import GenerationSettings, Generator

    label = label_of(reference)
    model_dir, version = model
    tables: dict[str, pa.Table] = {}
    generator: Generator | None = None
    for test_set, prompts in prompts_by_set.items():
        path = answers_path(store, run_id, label, test_set)
        if store.exists(path) and not config.evaluate.force:
            table = store.dataset([path]).to_table()
            if (table.column("id").to_pylist() == [p.id for p in prompts]
                    and set(table.column("model_version").to_pylist()) == {version}):
                tables[test_set] = table
                continue
        if generator is None:
            settings = GenerationSettings(
                max_new_tokens=config.evaluate.max_new_tokens,
                batch_size=config.evaluate.generation_batch_size,
                do_sample=config.evaluate.do_sample, temperature=config.evaluate.temperature)
            generator = Generator(model_dir, settings)
            log.info("answering with %s (%s backend)", reference, generator.backend)
        answers = generator.answer(prompts)
        table = pa.Table.from_pylist(
            [{**p.as_row(), "answer": a, "model": reference, "model_version": version}
             for p, a in
             zip(prompts, answers, strict=True)], schema=ANSWER_SCHEMA)
        store.write_table(path, table)
        tables[test_set] = table
    return tables


# ---- judging ---------------------------------------------------------------------------------
def with_offline_judge(config: GleanerConfig, base_url: str, model: str) -> GleanerConfig:
    """``config`` judged by the llama.cpp SmolLM2 server gleaner started at ``base_url``.

    The one rule for gleaner's own judge, wherever the server was started (the
    curate flow, for rater and judge at once, or :func:`judge_endpoint`): the
    offline token cap (a 135M model on CPU needs minutes for 1024 tokens, and
    only its first line is read), the score-line grammar unless
    ``evaluate.judge_grammar`` is False, and at most two requests in flight.
    """
    return config.with_overrides({
        "evaluate.judge.base_url": base_url,
        "evaluate.judge.model": model,
        "evaluate.judge.concurrency": min(config.evaluate.judge.concurrency, 2),
        "evaluate.judge_max_tokens": config.evaluate.offline_judge_max_tokens,
        "evaluate.judge_grammar": config.evaluate.judge_grammar is not False,
    })


@contextlib.contextmanager
def judge_endpoint(config: GleanerConfig) -> Iterator[GleanerConfig]:
    """``config`` with a judge to call: as configured, or the offline llama.cpp SmolLM2 server.

    The offline judge only proves the pipeline runs: a 135M model is no GPT-4.
    Its reviews parse (the grammar fixes the first line), its scores mean little.
    """
    if config.evaluate.judge.base_url:
        yield config
        return
    from gleaner.llm.local_server import local_llm_server

    log.warning("no judge endpoint configured: judging with the offline SmolLM2 server; "
                "set evaluate.judge.base_url (e.g. https://api.openai.com/v1) for GPT-4")
    with local_llm_server(q4_0=config.rate.offline_q4_0) as server:
        yield with_offline_judge(config, server.base_url, server.model)


def make_judge(config: GleanerConfig) -> Judge:
    """The judge ``config.evaluate`` describes (its endpoint must have a base_url)."""
    settings = config.evaluate
    return Judge(settings.judge, parse_retries=settings.parse_retries,
                 max_tokens=settings.judge_max_tokens,
                 grammar=SCORE_LINE_GRAMMAR if settings.judge_grammar else None)


def judgements_dir(store: Store, run_id: str, comparison: str, test_set: str) -> str:
    return store.run_path(run_id, "evaluate", comparison, "judgements", test_set)


def part_matches(store: Store, path: str, chunk: list[Pair]) -> bool:
    """A stored part is reusable only for the very same questions and answers."""
    stored = store.dataset([path]).to_table(columns=["key", "answer_a", "answer_b"]).to_pylist()
    return stored == [{"key": p.key, "answer_a": p.answer_a, "answer_b": p.answer_b}
                      for p in chunk]


def judge_sets(store: Store, run_id: str, config: GleanerConfig, comparison: str,
               pairs_by_set: dict[str, list[Pair]], rule: str) -> dict[str, pa.Table]:
    """Judgements per test set, written in parts of ``evaluate.judge_batch_pairs`` pairs.

    A part is the unit of checkpointing: a crash loses at most the part in
    flight, and a rerun judges only the parts the store does not hold (a part
    whose pairs differ, e.g. after a change of --limit, is judged again).
    """
    size = max(1, config.evaluate.judge_batch_pairs)
    plan: list[tuple[str, int, list[Pair]]] = []
    for test_set, pairs in pairs_by_set.items():
        directory = judgements_dir(store, run_id, comparison, test_set)
        if config.evaluate.force and store.fs.exists(directory):
            store.fs.rm(directory, recursive=True)
        done = store.part_paths(directory)
        for index in range(0, math.ceil(len(pairs) / size)):
            chunk = pairs[index * size:(index + 1) * size]
            if index in done and part_matches(store, done[index], chunk):
                continue
            plan.append((test_set, index, chunk))
    if plan:
        with judge_endpoint(config) as judging:
            judge = make_judge(judging)
            for test_set, index, chunk in plan:
                rows = [{**j.as_row(), "judge_model": judge.endpoint.model}
                        for j in judge.judge(chunk, rule)]
                directory = judgements_dir(store, run_id, comparison, test_set)
                store.write_table(posixpath.join(directory, part_name(index)),
                                  pa.Table.from_pylist(rows, schema=JUDGEMENT_SCHEMA))
    tables: dict[str, pa.Table] = {}
    for test_set, pairs in pairs_by_set.items():
        parts = store.part_paths(judgements_dir(store, run_id, comparison, test_set))
        wanted = [parts[i] for i in range(math.ceil(len(pairs) / size))]
        tables[test_set] = store.dataset(wanted, schema=JUDGEMENT_SCHEMA).to_table() if wanted \
            else JUDGEMENT_SCHEMA.empty_table()
    return tables


def judge_models(judgements: dict[str, pa.Table]) -> list[str]:
    """The judge model(s) that produced the stored judgements (the offline one, if it was used)."""
    return sorted({m for t in judgements.values() if "judge_model" in t.column_names
                   for m in t.column("judge_model").to_pylist() if m})


def tally_table(table: pa.Table, rule: str, price: PriceConfig) -> Tally:
    """W/T/L of one test set under ``rule``, from the per-order outcomes stored."""
    part = Tally()
    for first, second in zip(table.column("outcome_a_first").to_pylist(),
                             table.column("outcome_b_first").to_pylist(), strict=True):
        part.add(verdict(first, second, rule))
    part.prompt_tokens = int(sum(table.column("prompt_tokens").to_pylist()))
    part.completion_tokens = int(sum(table.column("completion_tokens").to_pylist()))
    part.cost_usd = (part.prompt_tokens * price.prompt + part.completion_tokens * price.completion
                     ) / 1e6
    return part


def report(store: Store, run_id: str, config: GleanerConfig, comparison: str, label_a: str,
           label_b: str, rule: str, judgements: dict[str, pa.Table],
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tallies, the markdown table and the chart, written to the store; returns the summary."""
    models = judge_models(judgements) or [config.evaluate.judge.model]
    price = config.prices.get(models[0], PriceConfig()) if len(models) == 1 else PriceConfig()
    per_set = {name: tally_table(table, rule, price) for name, table in judgements.items()}
    table_md = markdown_table(per_set, label_a, label_b, rule)
    base = store.run_path(run_id, "evaluate", comparison)
    report_path = store.write_bytes(posixpath.join(base, "report.md"), table_md.encode())
    chart_path = store.write_bytes(posixpath.join(base, "wtl.png"),
                                   stacked_bar_png(per_set, label_a, label_b))
    summary = {
        "run_id": run_id, "comparison": comparison, "model_a": label_a, "model_b": label_b,
        "rule": rule,
        "judge_model": ", ".join(models), "price_known": models[0] in config.prices,
        "test_sets": {name: part.as_dict() for name, part in per_set.items()},
        "overall": overall(per_set).as_dict(),
        "report": store.uri(report_path), "chart": store.uri(chart_path),
        "markdown": table_md, **(extra or {}),
    }
    store.write_json(posixpath.join(base, "summary.json"), summary)
    record_run(store, run_id, config, evaluate={comparison: {
        "rule": rule, "overall": summary["overall"], "report": summary["report"]}})
    return summary


# ---- the callables ---------------------------------------------------------------------------
AnswerFn = Callable[[str, dict[str, list[EvalPrompt]]], dict[str, list[str]]]
JudgeFn = Callable[[str, str, list[Pair]], pa.Table]


def answer_model(store: Store, run_id: str, config: GleanerConfig, reference: str,
                 prompts_by_set: dict[str, list[EvalPrompt]]) -> dict[str, list[str]]:
    """One model's answers to every test set (from the store where it already has them)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gleaner-eval-") as cache:
        model = resolve_model(store, run_id, config, reference, Path(cache))
        tables = generate_for(store, run_id, config, reference, model, prompts_by_set)
    return {name: table.column("answer").to_pylist() for name, table in tables.items()}


def judge_test_set(store: Store, run_id: str, config: GleanerConfig, comparison: str,
                   test_set: str, pairs: list[Pair], rule: str) -> pa.Table:
    return judge_sets(store, run_id, config, comparison, {test_set: pairs}, rule)[test_set]


def run_evaluate(store: Store, run_id: str, config: GleanerConfig, model_a: str | None = None,
                 model_b: str | None = None, test_sets: list[str] | None = None,
                 limit: int | None = None, rule: str | None = None,
                 answer_fn: AnswerFn | None = None, judge_fn: JudgeFn | None = None,
                 ) -> dict[str, Any]:
    """Both models answer every prompt of the test sets; the judge compares them (A = curated).

    ``answer_fn`` / ``judge_fn`` replace the plain per-model and per-test-set steps
    (the flow passes them as Prefect tasks, so each shows and retries on its own).
    """
    from gleaner.flows.finetune_flow import model_path

    rule = rule or config.evaluate.rule
    answer_fn = answer_fn or (lambda ref, prompts: answer_model(store, run_id, config, ref,
                                                                prompts))
    judge_fn = judge_fn or (lambda cmp, name, pairs: judge_test_set(store, run_id, config, cmp,
                                                                    name, pairs, rule))
    reference_a = model_a or config.evaluate.model_a
    reference_b = model_b or config.evaluate.model_b
    if (reference_b == "baseline" and config.finetune.baseline == "none" and not store.exists(
            posixpath.join(model_path(store, run_id, "baseline"), "config.json"))):
        log.warning("no baseline was trained (finetune.baseline = none): comparing %s with the "
                    "base model instead", reference_a)
        reference_b = "base"
    limit = limit if limit is not None else config.evaluate.limit
    prompts_by_set: dict[str, list[EvalPrompt]] = {}
    for spec in test_sets or config.evaluate.test_sets:
        prompts = load_eval_set(spec, config.evaluate.eval_sets_dir, limit)
        prompts_by_set[prompts[0].test_set if prompts else spec] = prompts
    label_a, label_b = label_of(reference_a), label_of(reference_b)
    if label_a == label_b:
        raise ValueError(f"models A and B have the same label {label_a!r}; compare two models")
    answers_a = answer_fn(reference_a, prompts_by_set)
    answers_b = answer_fn(reference_b, prompts_by_set)
    comparison = f"{label_a}-vs-{label_b}"
    judgements = {
        name: judge_fn(comparison, name, [
            Pair(name, p.id, p.question, a, b) for p, a, b in
            zip(prompts, answers_a[name], answers_b[name], strict=True)])
        for name, prompts in prompts_by_set.items()
    }
    return report(store, run_id, config, comparison, label_a, label_b, rule, judgements,
                  {"prompts": {n: len(p) for n, p in prompts_by_set.items()},
                   "answers": {label: store.uri(store.run_path(
                       run_id, "evaluate", "answers", label)) for label in (label_a, label_b)}})


def run_evaluate_answers(store: Store, run_id: str, config: GleanerConfig, answers_a: str,
                         answers_b: str, rule: str | None = None, limit: int | None = None,
                         judge_fn: JudgeFn | None = None) -> dict[str, Any]:
    """Judge two existing answer files (no generation); unmatched rows are counted and listed."""
    rule = rule or config.evaluate.rule
    judge_fn = judge_fn or (lambda cmp, name, pairs: judge_test_set(store, run_id, config, cmp,
                                                                    name, pairs, rule))
    options = config.store.options if answers_a.startswith("s3://") else None
    rows_a = load_answers(answers_a, options)
    rows_b = load_answers(answers_b, options)
    joined = join_answers(rows_a, rows_b)
    pairs = joined.pairs[:limit] if limit else joined.pairs
    pairs_by_set: dict[str, list[Pair]] = {}
    for pair in pairs:
        pairs_by_set.setdefault(pair.test_set, []).append(pair)
    label_a, label_b = label_of(Path(answers_a).stem), label_of(Path(answers_b).stem)
    if label_a == label_b:
        label_a, label_b = f"{label_a}-a", f"{label_b}-b"
    comparison = f"{label_a}-vs-{label_b}"
    unmatched = joined.unmatched_report()
    store.write_json(store.run_path(run_id, "evaluate", comparison, "unmatched.json"), unmatched)
    if unmatched:
        log.warning("%d answer rows have no partner in the other file (%d only in A, %d only "
                    "in B); listed in unmatched.json", len(unmatched), len(joined.only_a),
                    len(joined.only_b))
    judgements = {name: judge_fn(comparison, name, pairs) for name, pairs in pairs_by_set.items()}
    return report(store, run_id, config, comparison, label_a, label_b, rule, judgements, {
        "join_key": joined.join_key, "matched": len(joined.pairs),
        "only_in_a": len(joined.only_a), "only_in_b": len(joined.only_b),
        "prompt_mismatch": joined.prompt_mismatch, "unmatched": unmatched[:50],
        "answers_a": answers_a, "answers_b": answers_b})


# ---- Prefect ---------------------------------------------------------------------------------
def publish_artifacts(store: Store, summary: dict[str, Any]) -> None:
    """The W/T/L table (with the chart inline) and a per-set table, in the Prefect UI."""
    key = "evaluate-" + re.sub(r"[^a-z0-9-]+", "-",
                               f"{summary['run_id']}-{summary['model_a']}-vs-{summary['model_b']}"
                               .lower()).strip("-")
    try:
        png = store.read_bytes(store.run_path(summary["run_id"], "evaluate",
                                              summary["comparison"], "wtl.png"))
        image = f"\n![W/T/L](data:image/png;base64,{base64.b64encode(png).decode()})\n"
    except OSError:
        image = ""
    markdown = summary["markdown"] + image + f"\nReport: `{summary['report']}`\n"
    if summary.get("only_in_a") or summary.get("only_in_b"):
        markdown += (f"\n**Unmatched answer rows:** {summary['only_in_a']} only in A, "
                     f"{summary['only_in_b']} only in B (see unmatched.json)\n")
    create_markdown_artifact(key=key[:100], markdown=markdown,
                             description=f"pairwise evaluation ({summary['rule']} rule)")
    create_table_artifact(key=(key[:94] + "-table"), table=[
        {"test_set": name, **{k: part[k] for k in ("win", "tie", "lose", "failed",
                                                   "winning_score", "cost_usd")}}
        for name, part in {**summary["test_sets"], "overall": summary["overall"]}.items()])


@task(name="answer-test-sets", retries=0)
def answer_task(run_id: str, config: GleanerConfig, reference: str,
                prompts_by_set: dict[str, list[EvalPrompt]]) -> dict[str, list[str]]:
    """One model answers every test set (checkpointed per set; a retry resumes)."""
    return answer_model(Store(config.store.url, config.store.options), run_id, config,
                        reference, prompts_by_set)


@task(name="judge-test-set", retries=1, retry_delay_seconds=10)
def judge_task(run_id: str, config: GleanerConfig, comparison: str, test_set: str,
               pairs: list[Pair], rule: str) -> pa.Table:
    """Both orders for one test set (checkpointed in parts; a retry judges the missing parts)."""
    return judge_test_set(Store(config.store.url, config.store.options), run_id, config,
                          comparison, test_set, pairs, rule)


@flow(name="evaluate")
def evaluate_flow(run_id: str | None = None, config: GleanerConfig | None = None,
                  model_a: str | None = None, model_b: str | None = None,
                  answers_a: str | None = None, answers_b: str | None = None,
                  test_sets: list[str] | None = None, limit: int | None = None,
                  rule: str | None = None) -> dict[str, Any]:
    """Compare model A (the curated one) with model B, or two answer files; publish the report."""
    config = config or GleanerConfig()
    run_id = run_id or config.run_id or new_run_id()
    rule = rule or config.evaluate.rule
    store = Store(config.store.url, config.store.options)

    def answer_fn(reference: str, prompts: dict[str, list[EvalPrompt]]) -> dict[str, list[str]]:
        named = answer_task.with_options(task_run_name=f"answer-{label_of(reference)}")
        return named(run_id, config, reference, prompts)

    def judge_fn(comparison: str, test_set: str, pairs: list[Pair]) -> pa.Table:
        named = judge_task.with_options(task_run_name=f"judge-{test_set}")
        return named(run_id, config, comparison, test_set, pairs, rule)

    if answers_a or answers_b:
        if not (answers_a and answers_b):
            raise ValueError("judging answer files needs both --answers-a and --answers-b")
        summary = run_evaluate_answers(store, run_id, config, answers_a, answers_b, rule, limit,
                                       judge_fn=judge_fn)
    else:
        summary = run_evaluate(store, run_id, config, model_a, model_b, test_sets, limit, rule,
                               answer_fn=answer_fn, judge_fn=judge_fn)
    publish_artifacts(store, summary)
    return summary
