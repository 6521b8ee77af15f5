"""Pairwise evaluation, plain steps: answers from two models, judged in both orders, reports.

``run_evaluate`` (generate, then judge) and ``run_evaluate_answers`` (judge two
existing answer files) are what the evaluate flow composes. Answers and
judgements are checkpoints (paths in gleaner.layout): a rerun reuses every
test set the store already holds for the same model version (``evaluate.force``
redoes them), and the judge is an engine stage (cached by pair content and
judge settings). Judgements keep each order's outcome, so the combination rule
is applied when the report is made.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import posixpath
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import task

from gleaner import layout
from gleaner.config import GleanerConfig, PriceConfig
from gleaner.engine import run_stage
from gleaner.engine.step import publish_markdown, run_step
from gleaner.runs import record_run
from gleaner.store import Store
from gleaner.tasks.evaluate.answer_stage import AnsweringModel, answer_prompts
from gleaner.tasks.evaluate.answers import join_answers, load_answers
from gleaner.tasks.evaluate.backends import Sampling
from gleaner.tasks.evaluate.eval_sets import EvalPrompt, load_eval_set
from gleaner.tasks.evaluate.generation import PromptRenderer
from gleaner.tasks.evaluate.judge import Pair
from gleaner.tasks.evaluate.likert import Rated, rate_answers
from gleaner.tasks.evaluate.stage import JUDGEMENT_SCHEMA, JudgeStage, pairs_table
from gleaner.tasks.evaluate.verdicts import Tally, markdown_table, overall, stacked_bar_png, verdict

log = logging.getLogger("gleaner.evaluate")
ANSWER_SCHEMA = pa.schema([
    ("test_set", pa.string()), ("id", pa.string()), ("instruction", pa.string()),
    ("input", pa.string()), ("question", pa.string()), ("answer", pa.string()),
    ("model", pa.string()), ("model_version", pa.string()),
])
SAMPLED_SCHEMA = ANSWER_SCHEMA.append(pa.field("sample", pa.int32()))


def label_of(reference: str) -> str:
    """A short, path-safe name for a model reference (``curated``, ``HuggingFaceTB/x`` ...)."""
    name = Path(reference.rstrip("/")).name if "/" in reference else reference
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-").lower() or "model"


# ---- models ----------------------------------------------------------------------------------
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def resolve_model(store: Store, run_id: str, config: GleanerConfig, reference: str,
                  cache_dir: Path) -> tuple[AnsweringModel, PromptRenderer]:
    """The model ``reference`` names: one of this run's trained models, ``base``, a local
    folder or an HF hub id, with its version and its prompt format.

    A trained model in an object store is not downloaded here: the driver copies its small
    files (tokenizer, config, format) to render prompts, and each answering actor copies
    the weights where it runs."""
    from gleaner.tasks.train.run import model_path, resolve_base_model

    store_path = None
    version = model_identity(store, run_id, config, reference)
    if reference == "base":
        folder = resolve_base_model(config.finetune.base_model)
    else:
        in_store = model_path(store, run_id, reference) \
            if re.fullmatch(r"[a-z0-9_-]+", reference) else None
        if in_store and store.exists(posixpath.join(in_store, "config.json")):
            folder = in_store
            if not store.is_local:
                folder, store_path = str(cache_dir / reference), in_store
                for path in store.fs.find(in_store):
                    if not path.endswith(WEIGHT_SUFFIXES):
                        local = Path(folder) / posixpath.relpath(path, in_store.rstrip("/"))
                        local.parent.mkdir(parents=True, exist_ok=True)
                        store.fs.get(path, str(local))
        elif Path(reference).exists():
            folder = reference
        elif in_store and "/" not in reference:
            raise FileNotFoundError(
                f"model {reference!r}: not a trained model of run {run_id!r} "
                f"({store.uri(in_store)} is missing) nor a local folder")
        else:
            folder = reference  # an HF hub id
    renderer = PromptRenderer(folder)
    served = config.evaluate.generation.served_models.get(reference, reference)
    return AnsweringModel(reference, version, renderer.model_spec(served), store_path), renderer


def model_identity(store: Store, run_id: str, config: GleanerConfig, reference: str) -> str:
    """What identifies the weights ``reference`` names, without loading or copying them: a
    trained model of the run by its metrics.json (every training rewrites it), a folder by
    its files, a hub id by its name."""
    from gleaner.tasks.train.run import model_path, resolve_base_model

    if reference == "base":
        return model_version(resolve_base_model(config.finetune.base_model))
    if re.fullmatch(r"[a-z0-9_-]+", reference):
        in_store = model_path(store, run_id, reference)
        if store.exists(posixpath.join(in_store, "config.json")):
            metrics = store.run_path(run_id, "finetune", reference, "metrics.json")
            return hashlib.sha256(store.read_bytes(metrics)).hexdigest()[:16] \
                if store.exists(metrics) else model_version(in_store)
    return model_version(reference) if Path(reference).exists() else reference


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


def generate_for(store: Store, run_id: str, config: GleanerConfig, model: AnsweringModel,
                 renderer: PromptRenderer, prompts_by_set: dict[str, list[EvalPrompt]],
                 ) -> dict[str, pa.Table]:
    """One model's answers to every test set, through the answer stage (resumed and cached
    there); each test set's answers are written as one file for the report and the judge.
    With ``evaluate.likert.samples`` N > 1 the same stage also samples N - 1 more answers
    per prompt (sample k seeded k), and every sample is written to the samples files."""
    settings = config.evaluate
    sampling = Sampling(settings.generation.max_tokens, settings.generation.temperature
                        if settings.generation.do_sample else 0.0)
    samples = likert_samples(config)
    items = [p for prompts in prompts_by_set.values() for p in prompts]
    log.info("answering %d prompts (%d sample(s) each) with %s (%s back end)", len(items),
             samples, model.reference, settings.generation.backend)
    rendered = renderer.prompts(items)
    answered = answer_prompts(
        store, run_id, config, layout.generation_scope(label_of(model.reference)), model,
        rendered * samples, [replace(sampling, seed=k) for k in range(samples)
                             for _ in rendered])
    answers, tables = iter(answered), {}
    for test_set, prompts in prompts_by_set.items():
        table = pa.Table.from_pylist(
            [{**p.as_row(), "answer": next(answers), "model": model.reference,
              "model_version": model.version} for p in prompts], schema=ANSWER_SCHEMA)
        store.write_table(layout.answers_path(store, run_id, label_of(model.reference),
                                              test_set), table)
        tables[test_set] = table
    if samples > 1:
        start = 0
        for test_set, prompts in prompts_by_set.items():
            rows = [{**p.as_row(), "answer": answered[k * len(items) + start + i],
                     "model": model.reference, "model_version": model.version, "sample": k}
                    for k in range(samples) for i, p in enumerate(prompts)]
            store.write_table(layout.sampled_answers_path(
                store, run_id, label_of(model.reference), test_set),
                pa.Table.from_pylist(rows, schema=SAMPLED_SCHEMA))
            start += len(prompts)
    return tables


# ---- judging (an engine stage per test set) ---------------------------------------------------
def judge_test_set(store: Store, run_id: str, config: GleanerConfig, comparison: str,
                   test_set: str, pairs: list[Pair]) -> pa.Table:
    """Both orders for one test set's pairs (needs a judge endpoint, Ray and a flow run)."""
    stage = JudgeStage(config, comparison, test_set)
    store.clear_stage(run_id, stage.input_stage)
    store.write_part(run_id, stage.input_stage, 0, pairs_table(pairs))
    if not pairs:
        return JUDGEMENT_SCHEMA.empty_table()
    run_stage(stage, config, run_id)
    return store.read_stage(run_id, stage.name, schema=JUDGEMENT_SCHEMA)


def judge_models(judgements: dict[str, pa.Table]) -> list[str]:
    """The judge model(s) that produced the stored judgements (the offline one, if it was used)."""
    return sorted({m for t in judgements.values() if "judge_model" in t.column_names
                   for m in t.column("judge_model").to_pylist() if m})


def tally_table(table: pa.Table, rule: str, price: PriceConfig) -> Tally:
    """W/T/L of one test set under ``rule``, from the per-order outcomes stored."""
    part = Tally()
    for first, second, answer_a, answer_b in zip(
            table.column("outcome_a_first").to_pylist(), table.column("outcome_b_first")
            .to_pylist(), table.column("answer_a").to_pylist(),
            table.column("answer_b").to_pylist(), strict=True):
        part.add(verdict(first, second, rule), len(answer_a or ""), len(answer_b or ""))
    part.prompt_tokens = int(sum(table.column("prompt_tokens").to_pylist()))
    part.completion_tokens = int(sum(table.column("completion_tokens").to_pylist()))
    part.cost_usd = (part.prompt_tokens * price.prompt + part.completion_tokens * price.completion
                     ) / 1e6
    return part


def report(store: Store, run_id: str, config: GleanerConfig, comparison: str, label_a: str,
           label_b: str, rule: str, judgements: dict[str, pa.Table],
           extra: dict[str, Any] | None = None, likert: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    """Tallies, the markdown table and the chart, written to the store; returns the summary.
    ``likert``: LIMA's absolute evaluation (tasks/evaluate/likert.py), its table appended."""
    models = judge_models(judgements) or [config.evaluate.endpoint.model]
    price = config.prices.get(models[0], PriceConfig()) if len(models) == 1 else PriceConfig()
    per_set = {name: tally_table(table, rule, price) for name, table in judgements.items()}
    table_md = markdown_table(per_set, label_a, label_b, rule)
    if likert:
        table_md += "\n" + likert["markdown"]
    base = layout.comparison_dir(store, run_id, comparison)
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
        **({"likert": {k: v for k, v in likert.items() if k != "markdown"}} if likert else {}),
    }
    store.write_json(posixpath.join(base, "summary.json"), summary)
    record_run(store, run_id, config, evaluate={comparison: {
        "rule": rule, "overall": summary["overall"], "report": summary["report"],
        **({"likert": {m: r["overall"] for m, r in likert["models"].items()}} if likert else {})}})
    return summary


def stored_comparisons(store: Store, run_id: str) -> dict[str, dict[str, Any]]:
    """Every pairwise evaluation the run holds (``evaluate/<a>-vs-<b>/summary.json``, the
    grid's arms' included), by comparison name."""
    base = store.run_path(run_id, "evaluate")
    try:
        paths = store.fs.glob(posixpath.join(base, "*", "summary.json"))
    except FileNotFoundError:
        return {}
    out = {}
    for path in sorted(paths):
        summary = store.read_json(path)
        if "test_sets" in summary:  # not mt_bench/<model>/summary.json and the like
            out[posixpath.basename(posixpath.dirname(path))] = summary
    return out


# ---- LIMA's absolute evaluation (tasks/evaluate/likert.py) ------------------------------------
def likert_samples(config: GleanerConfig) -> int:
    """Answers per prompt and model: ``evaluate.likert.samples`` when it rates, else 1."""
    likert = config.evaluate.likert
    return likert.samples if likert.enabled else 1


def generated_items(store: Store, run_id: str, config: GleanerConfig, label: str,
                    prompts_by_set: dict[str, list[EvalPrompt]],
                    answers: dict[str, list[str]]) -> list[Rated]:
    """One model's answers to rate: sample 0 is the answer judged pairwise; more samples
    come from the samples files the answering wrote."""
    samples = likert_samples(config)
    items = []
    for name, prompts in prompts_by_set.items():
        if samples == 1:
            items += [Rated(label, name, p.id, 0, p.question, a)
                      for p, a in zip(prompts, answers[name], strict=True)]
            continue
        table = store.dataset([layout.sampled_answers_path(store, run_id, label, name)]
                              ).to_table()
        items += [Rated(label, name, r["id"], r["sample"], r["question"], r["answer"])
                  for r in table.to_pylist()]
    return items


def paired_items(label_a: str, label_b: str, pairs: list[Pair]) -> list[Rated]:
    """Both files' joined answers to rate: a prompt repeated within a test set is one prompt
    with a sample per occurrence (its first pair's key names it)."""
    first: dict[tuple[str, str], str] = {}
    seen: dict[tuple[str, str], int] = {}
    items = []
    for pair in pairs:
        prompt = (pair.test_set, pair.question.strip())
        key, sample = first.setdefault(prompt, pair.key), seen.get(prompt, 0)
        seen[prompt] = sample + 1
        items += [Rated(label_a, pair.test_set, key, sample, pair.question, pair.answer_a),
                  Rated(label_b, pair.test_set, key, sample, pair.question, pair.answer_b)]
    return items


# ---- the callables ---------------------------------------------------------------------------
AnswerFn = Callable[[str, dict[str, list[EvalPrompt]]], dict[str, list[str]]]
JudgeFn = Callable[[str, str, list[Pair]], pa.Table]


def answer_model(store: Store, run_id: str, config: GleanerConfig, reference: str,
                 prompts_by_set: dict[str, list[EvalPrompt]]) -> dict[str, list[str]]:
    """One model's answers to every test set (from the store where it already has them)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gleaner-eval-") as cache:
        model, renderer = resolve_model(store, run_id, config, reference, Path(cache))
        tables = generate_for(store, run_id, config, model, renderer, prompts_by_set)
    return {name: table.column("answer").to_pylist() for name, table in tables.items()}


def run_evaluate(store: Store, run_id: str, config: GleanerConfig, model_a: str | None = None,
                 model_b: str | None = None, test_sets: list[str] | None = None,
                 limit: int | None = None, rule: str | None = None,
                 answer_fn: AnswerFn | None = None, judge_fn: JudgeFn | None = None,
                 ) -> dict[str, Any]:
    """Both models answer every prompt of the test sets; the judge compares them (A = curated).

    ``answer_fn`` / ``judge_fn`` replace the plain per-model and per-test-set steps
    (the flow passes them as Prefect tasks, so each shows and retries on its own).
    """

    from gleaner.tasks.evaluate.step import EvaluateStep

    rule = rule or config.evaluate.rule
    reference_a = model_a or config.evaluate.model_a
    reference_b = model_b or config.evaluate.model_b
    if (reference_b == "baseline" and config.finetune.baseline == "none" and not store.exists(
            posixpath.join(layout.model_dir(store, run_id, "baseline"), "config.json"))):
        log.warning("no baseline was trained (finetune.baseline = none): comparing %s with the "
                    "base model instead", reference_a)
        reference_b = "base"
    limit = limit if limit is not None else config.evaluate.limit
    label_a, label_b = label_of(reference_a), label_of(reference_b)
    if label_a == label_b:
        raise ValueError(f"models A and B have the same label {label_a!r}; compare two models")
    specs = list(test_sets or config.evaluate.test_sets)
    step = EvaluateStep(store, run_id, config, f"{label_a}-vs-{label_b}",
                        (reference_a, reference_b), specs, limit, rule,
                        lambda: _evaluate(store, run_id, config, reference_a, reference_b, specs,
                                          limit, rule, answer_fn, judge_fn))
    return run_step(store, run_id, step, force=config.evaluate.force)


def _evaluate(store: Store, run_id: str, config: GleanerConfig, reference_a: str,
              reference_b: str, specs: list[str], limit: int | None, rule: str,
              answer_fn: AnswerFn | None, judge_fn: JudgeFn | None) -> dict[str, Any]:
    answer_fn = answer_fn or (lambda ref, prompts: answer_model(store, run_id, config, ref,
                                                                prompts))
    judge_fn = judge_fn or (lambda cmp, name, pairs: judge_test_set(store, run_id, config, cmp,
                                                                    name, pairs))
    prompts_by_set: dict[str, list[EvalPrompt]] = {}
    for spec in specs:
        prompts = load_eval_set(spec, config.evaluate.test_sets_dir, limit)
        prompts_by_set[prompts[0].test_set if prompts else spec] = prompts
    label_a, label_b = label_of(reference_a), label_of(reference_b)
    answers_a = answer_fn(reference_a, prompts_by_set)
    answers_b = answer_fn(reference_b, prompts_by_set)
    comparison = f"{label_a}-vs-{label_b}"
    judgements = {
        name: judge_fn(comparison, name, [
            Pair(name, p.id, p.question, a, b) for p, a, b in
            zip(prompts, answers_a[name], answers_b[name], strict=True)])
        for name, prompts in prompts_by_set.items()
    }
    likert = rate_answers(store, run_id, config, comparison, [
        *generated_items(store, run_id, config, label_a, prompts_by_set, answers_a),
        *generated_items(store, run_id, config, label_b, prompts_by_set, answers_b)],
        likert_samples(config)) if config.evaluate.likert.enabled else None
    return report(store, run_id, config, comparison, label_a, label_b, rule, judgements,
                  {"prompts": {n: len(p) for n, p in prompts_by_set.items()},
                   "answers": {label: store.uri(layout.answers_dir(store, run_id, label))
                               for label in (label_a, label_b)}}, likert)


def run_evaluate_answers(store: Store, run_id: str, config: GleanerConfig, answers_a: str,
                         answers_b: str, rule: str | None = None, limit: int | None = None,
                         judge_fn: JudgeFn | None = None) -> dict[str, Any]:
    """Judge two existing answer files (no generation); unmatched rows are counted and listed."""
    rule = rule or config.evaluate.rule
    judge_fn = judge_fn or (lambda cmp, name, pairs: judge_test_set(store, run_id, config, cmp,
                                                                    name, pairs))
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
    store.write_json(posixpath.join(layout.comparison_dir(store, run_id, comparison),
                                    "unmatched.json"), unmatched)
    if unmatched:
        log.warning("%d answer rows have no partner in the other file (%d only in A, %d only "
                    "in B); listed in unmatched.json", len(unmatched), len(joined.only_a),
                    len(joined.only_b))
    judgements = {name: judge_fn(comparison, name, pairs) for name, pairs in pairs_by_set.items()}
    likert = rate_answers(store, run_id, config, comparison,
                          paired_items(label_a, label_b, pairs), 1) \
        if config.evaluate.likert.enabled else None
    return report(store, run_id, config, comparison, label_a, label_b, rule, judgements, {
        "join_key": joined.join_key, "matched": len(joined.pairs),
        "only_in_a": len(joined.only_a), "only_in_b": len(joined.only_b),
        "prompt_mismatch": joined.prompt_mismatch, "unmatched": unmatched[:50],
        "answers_a": answers_a, "answers_b": answers_b}, likert)


def publish_artifacts(store: Store, summary: dict[str, Any]) -> None:
    """The W/T/L table (with the chart inline) and a per-set table, in the Prefect UI."""
    key = "evaluate-" + re.sub(r"[^a-z0-9-]+", "-",
                               f"{summary['run_id']}-{summary['model_a']}-vs-{summary['model_b']}"
                               .lower()).strip("-")
    try:
        png = store.read_bytes(posixpath.join(layout.comparison_dir(
            store, summary["run_id"], summary["comparison"]), "wtl.png"))
        image = f"\n![W/T/L](data:image/png;base64,{base64.b64encode(png).decode()})\n"
    except OSError:
        image = ""
    markdown = summary["markdown"] + image + f"\nReport: `{summary['report']}`\n"
    if summary.get("only_in_a") or summary.get("only_in_b"):
        markdown += (f"\n**Unmatched answer rows:** {summary['only_in_a']} only in A, "
                     f"{summary['only_in_b']} only in B (see unmatched.json)\n")
    publish_markdown(key[:100], markdown, f"pairwise evaluation ({summary['rule']} rule)", table=[
        {"test_set": name, **{k: part[k] for k in ("win", "tie", "lose", "failed",
                                                   "winning_score", "win_rate",
                                                   "lc_win_rate", "cost_usd")}}
        for name, part in {**summary["test_sets"], "overall": summary["overall"]}.items()])


@task(name="answer-test-sets", retries=0)
def answer_task(run_id: str, config: GleanerConfig, reference: str,
                prompts_by_set: dict[str, list[EvalPrompt]]) -> dict[str, list[str]]:
    """One model answers every test set (checkpointed per set; a retry resumes)."""
    return answer_model(Store(config.store.url, config.store.options), run_id, config,
                        reference, prompts_by_set)
