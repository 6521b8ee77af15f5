"""The cost plan: what a run would send to priced models, and what it would cost, before it runs.

For each LLM stage the run would run (rating; DEITA's scorers behind an
endpoint; the judge of each test set) the plan counts the requests *after*
what the engine would not send: the run's finished parts and the cross-run
cache (the engine's own :func:`~gleaner.engine.runner.stage_work` and
:func:`~gleaner.engine.runner.cache_hits`), so a refresh plans only what
changed. The requests themselves are the stage's own, recorded by running its
worker against a client that only writes requests down (the Batch API's
:class:`~gleaner.engine.replay.ReplayWorker` with no answers): their bodies are
exactly what would be sent, counted by :mod:`gleaner.tasks.cost.tokens`. Completion
tokens are the recorded mean per request where the store holds usage of the
same requests, else each request's ``max_tokens`` (an upper bound, said so).
Parse retries are not planned. Then each stage is priced synchronously and at
the Batch API's price (``prices.<model>.batch``), and the fine-tunes are
counted in tokens of the base model's tokenizer.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gleaner import layout
from gleaner.config import GleanerConfig, PriceConfig
from gleaner.engine.batches import InputIndex, read_segments
from gleaner.engine.cache import cache_files
from gleaner.engine.plan import Plan, PlanMismatch, settings_key
from gleaner.engine.replay import BatchRequest, Pending, Policy, ReplayWorker
from gleaner.engine.runner import StageWork, cache_hits, stage_work
from gleaner.engine.stage import LLMStage
from gleaner.engine.summary import estimate_cost
from gleaner.llm.offline import offline_endpoint
from gleaner.store import Store
from gleaner.tasks.cost.tokens import CharsPerToken, calibrated, counter_for

log = logging.getLogger("gleaner.tasks.cost")
CALIBRATION_ROWS = 400  # recorded rows the chars-per-token ratio is fitted on, at most
FINETUNE_SAMPLE = 500  # examples tokenised to count a fine-tune's tokens


@dataclass
class StagePlan:
    """One stage and model: what would be sent and what it would cost."""

    stage: str
    model: str
    api: str  # chat | batch: how the stage is configured to run
    rows: int  # the stage's input rows
    finished: int  # rows the run's finished parts already hold
    cached: int  # rows the cross-run cache holds
    to_do: int  # rows that would be made now
    requests: int
    prompt_tokens: int
    completion_tokens: int
    completion_bound: bool  # completion tokens are the requests' max_tokens: an upper bound
    counter: str  # how prompt tokens were counted
    priced: bool
    sync_usd: float | None
    batch_usd: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def usd(self) -> float | None:
        return self.batch_usd if self.api == "batch" else self.sync_usd


@dataclass
class FinetunePlan:
    arm: str
    examples: int
    epochs: float
    tokens_per_example: float
    tokens: int  # over all epochs
    tokenizer: str
    note: str = ""


# ---- the requests a stage would send --------------------------------------------------------
def record_requests(stage: LLMStage, rows: pa.Table) -> list[BatchRequest]:
    """The first requests the stage's worker would send for ``rows`` (none is sent)."""
    if rows.num_rows == 0:
        return []
    worker = ReplayWorker(stage, lambda ids: ({}, {}), Policy())
    try:
        worker.process(rows)
    except Pending as pending:
        return list(pending.requests)
    finally:
        worker.close()
    return []  # rows that need no request (nothing to score)


def _ids_in(store: Store, files: Sequence[str], ids: pa.Array) -> set[str]:
    out: set[str] = set()
    for path in files:
        column = store.dataset([path]).to_table(columns=["id"]).column("id")
        out.update(column.filter(pc.is_in(column, value_set=ids)).to_pylist())
    return out


def _work(stage: LLMStage, store: Store, run_id: str, index: InputIndex
          ) -> tuple[StageWork, list[str]]:
    """What run_stage would find to do (nothing is changed), or everything when it would
    start afresh (--force, other settings than the run's parts were made with)."""
    notes: list[str] = []
    if not stage.section.force:
        try:
            return stage_work(stage, store, run_id, index, dry_run=True), notes
        except PlanMismatch as error:
            notes.append(f"the run's parts would not be reused: {error}")
    bounds = index.bounds(stage.resources.batch_size)
    return StageWork(Plan(stage.name, stage.requested(), {}), None, bounds, set(), {},
                     list(range(len(bounds)))), notes


def pending_rows(stage: LLMStage, store: Store, run_id: str, index: InputIndex,
                 input_store: Store) -> tuple[Iterator[pa.Table], dict[str, int], list[str]]:
    """The input rows the engine would send now, batch by batch, and where the rest are."""
    work, notes = _work(stage, store, run_id, index)
    lookup = cache_hits(stage, store, work, index)
    counts = {"finished": 0, "cached": 0}
    for i in range(len(work.bounds)):
        if i not in work.pending:
            counts["finished"] += work.bounds[i][1] - work.bounds[i][0]

    def batches() -> Iterator[pa.Table]:
        for i in work.pending:
            ids = index.batch_ids(*work.bounds[i])
            skip = _ids_in(store, lookup.files.get(i, []), ids)
            counts["cached"] += len(skip)
            if i in work.retry:  # --retry-failed: the ok rows of the part stay
                part = store.dataset([work.retry[i]]).to_table(columns=["id", "status"])
                ok = part.filter(pc.equal(part["status"], "ok")).column("id").to_pylist()
                counts["finished"] += len(ok)
                skip.update(ok)
            rows = read_segments(input_store, index.segments(*work.bounds[i]),
                                 list(stage.input_columns))
            if skip:
                rows = rows.filter(pc.invert(pc.is_in(rows["id"], pa.array(sorted(skip)))))
            yield rows

    return batches(), counts, notes


# ---- calibration on recorded usage -----------------------------------------------------------
@dataclass
class Recorded:
    chars_per_token: CharsPerToken | None
    completion_per_request: float | None


def recorded_usage(stage: LLMStage, store: Store, run_id: str, index: InputIndex,
                   input_store: Store, config: GleanerConfig) -> Recorded:
    """Usage the store recorded for requests this stage would make again: the run's own
    finished rows, else the cache rows of the same settings for examples of this input."""
    samples: list[pa.Table] = []
    columns = ["id", "status", "cached", "attempts", "prompt_tokens", "completion_tokens"]
    if store.has_stage(run_id, stage.name):
        table = store.read_stage(run_id, stage.name, columns=columns, schema=stage.schema)
        samples.append(table.filter(pc.and_(pc.equal(table["status"], "ok"),
                                            pc.invert(table["cached"]))).drop(["cached"]))
    directory = layout.cache_dir(store, stage.cache_name, settings_key(stage.requested()))

    for path in cache_files(store, directory)[:20]:
        table = store.dataset([path], schema=stage.schema).to_table(columns=columns)
        samples.append(table.filter(pc.is_in(table["id"], value_set=index.ids)).drop(["cached"]))
    if not samples:
        return Recorded(None, None)
    table = pa.concat_tables(samples)
    seen: set[str] = set()
    rows: dict[str, dict[str, Any]] = {}
    for row in table.to_pylist():
        if row["id"] not in seen and len(rows) < CALIBRATION_ROWS:
            seen.add(row["id"])
            rows[row["id"]] = row
    if not rows:
        return Recorded(None, None)
    inputs = input_store.dataset(index.paths).to_table(
        columns=list(stage.input_columns), filter=pc.field("id").isin(list(rows)))
    by_row: dict[str, list[BatchRequest]] = defaultdict(list)
    for request in record_requests(stage, inputs):
        by_row[request.example_id].append(request)
    # rows answered at the first try: their recorded tokens are exactly these requests'
    exact = [i for i, requests in by_row.items() if rows[i]["attempts"] == len(requests)]
    if not exact:
        return Recorded(None, None)
    pairs = [(r.url, r.body) for i in exact for r in by_row[i]]
    prompt = sum(rows[i]["prompt_tokens"] for i in exact)
    completion = sum(rows[i]["completion_tokens"] for i in exact)
    return Recorded(calibrated(config.budget, pairs, prompt), completion / len(pairs))


# ---- one stage ---------------------------------------------------------------------------------
def plan_stage(stage: LLMStage, store: Store, run_id: str, input_store: Store,
               config: GleanerConfig) -> list[StagePlan]:
    """The plan of one engine stage over its input (one entry per model it calls)."""
    index = InputIndex.build(input_store, run_id, stage.input_stage)
    batches, counts, notes = pending_rows(stage, store, run_id, index, input_store)
    requests = [r for rows in batches for r in record_requests(stage, rows)]
    to_do = len({r.example_id for r in requests})
    recorded = recorded_usage(stage, store, run_id, index, input_store, config)
    by_model: dict[str, list[BatchRequest]] = defaultdict(list)
    for request in requests:
        by_model[request.endpoint.model].append(request)
    if not by_model:
        by_model[stage.endpoint.model] = []
    out = []
    for model, members in by_model.items():
        endpoint = members[0].endpoint if members else stage.endpoint
        counter = counter_for(endpoint, config.budget, recorded.chars_per_token)
        prompt = sum(counter.prompt_tokens(r.url, r.body) for r in members)
        if recorded.completion_per_request is not None:
            completion = round(recorded.completion_per_request * len(members))
        else:
            completion = sum(int(r.body.get("max_tokens") or 0) for r in members)
        out.append(priced(StagePlan(
            stage.name, model, endpoint.api, index.rows, counts["finished"], counts["cached"],
            to_do, len(members), prompt, completion, recorded.completion_per_request is None,
            counter.name, False, None, None, list(notes)), config.prices.get(model)))
    return out


def priced(plan: StagePlan, price: PriceConfig | None) -> StagePlan:
    plan.priced = price is not None
    plan.sync_usd = estimate_cost(price, plan.prompt_tokens, plan.completion_tokens)
    plan.batch_usd = estimate_cost(price, plan.prompt_tokens, plan.completion_tokens,
                                   plan.prompt_tokens, plan.completion_tokens)
    return plan


# ---- the judge (its answers do not exist before the run) ---------------------------------------
def plan_judge(config: GleanerConfig) -> list[StagePlan]:
    """Both orders of every prompt of the test sets; each answer counted at its cap
    (``evaluate.generation.max_tokens``), the review at ``evaluate.max_tokens``: upper bounds."""
    from gleaner.llm.client import chat_request, request_body
    from gleaner.tasks.evaluate.eval_sets import load_eval_set
    from gleaner.tasks.evaluate.judge import JUDGE_TEMPERATURE, judge_messages
    from gleaner.tasks.evaluate.run import label_of

    settings = config.evaluate
    comparison = f"{label_of(settings.model_a)}-vs-{label_of(settings.model_b)}"
    judge = settings.endpoint if settings.endpoint.base_url else offline_endpoint(settings.endpoint)
    counter = counter_for(judge, config.budget)
    max_tokens = settings.max_tokens if judge.base_url else settings.offline_max_tokens
    out = []
    for spec in settings.test_sets:
        prompts = load_eval_set(spec, settings.test_sets_dir, settings.limit)
        name = prompts[0].test_set if prompts else spec
        prompt_tokens = 0
        for prompt in prompts:
            body = request_body(chat_request(judge.model, judge_messages(prompt.question, "", ""),
                                             max_tokens=max_tokens,
                                             temperature=JUDGE_TEMPERATURE))
            prompt_tokens += 2 * (counter.prompt_tokens("/v1/chat/completions", body)
                                  + 2 * settings.generation.max_tokens)
        out.append(priced(StagePlan(
            layout.judge_stage(comparison, name), judge.model, judge.api,
            len(prompts), 0, 0, len(prompts), 2 * len(prompts), prompt_tokens,
            2 * len(prompts) * max_tokens, True, counter.name, False, None, None,
            [f"answers counted at evaluate.generation.max_tokens = "
             f"{settings.generation.max_tokens} tokens each (they do not exist yet): an upper "
             "bound"]),
            config.prices.get(judge.model)))
    return out


def plan_likert(config: GleanerConfig) -> list[StagePlan]:
    """LIMA's rating (``evaluate.likert``, when on) of both models' N samples per prompt, each
    answer counted at ``evaluate.generation.max_tokens``, the judge's answer at its cap: upper
    bounds."""
    from gleaner.llm.client import chat_request, request_body
    from gleaner.tasks.evaluate.eval_sets import load_eval_set
    from gleaner.tasks.evaluate.likert import likert_messages
    from gleaner.tasks.evaluate.run import label_of

    settings, likert = config.evaluate, config.evaluate.likert
    if not likert.enabled:
        return []
    judge = settings.endpoint if settings.endpoint.base_url else offline_endpoint(settings.endpoint)
    counter = counter_for(judge, config.budget)
    max_tokens = likert.max_tokens if judge.base_url else likert.offline_max_tokens
    answers = 2 * likert.samples  # both models, N samples each
    prompt_tokens = rows = 0
    for spec in settings.test_sets:
        for prompt in load_eval_set(spec, settings.test_sets_dir, settings.limit):
            body = request_body(chat_request(judge.model, likert_messages(prompt.question, ""),
                                             max_tokens=max_tokens, temperature=0.0))
            prompt_tokens += answers * (counter.prompt_tokens("/v1/chat/completions", body)
                                        + settings.generation.max_tokens)
            rows += answers
    comparison = f"{label_of(settings.model_a)}-vs-{label_of(settings.model_b)}"
    return [priced(StagePlan(
        layout.likert_stage(comparison), judge.model, judge.api, rows, 0, 0, rows, rows,
        prompt_tokens, rows * max_tokens, True, counter.name, False, None, None,
        [f"answers counted at evaluate.generation.max_tokens = "
         f"{settings.generation.max_tokens} tokens each (they do not exist yet): an upper "
         "bound"]), config.prices.get(judge.model))]


# ---- fine-tunes --------------------------------------------------------------------------------
def plan_finetunes(config: GleanerConfig, pool: pa.Table) -> list[FinetunePlan]:
    """The arms curate trains and their tokens (the base model's tokenizer, the recipe's
    template, max_length and epochs), counted on a sample of the pool."""
    from gleaner.tasks.train.recipes import build_recipe
    from gleaner.tasks.train.sft_data import SftFormat, prepare_tokenizer, tokenise

    if not (config.curate.train and pool.num_rows):
        return []
    recipe = build_recipe(config.finetune.preset, config.finetune.overrides)
    fmt = SftFormat(recipe.template, recipe.end_of_turn_token)
    sample = pool.slice(0, FINETUNE_SAMPLE).to_pylist()
    source = config.finetune.base_model
    try:
        from gleaner.tasks.cost.tokens import load_tokenizer

        if source is None:
            from gleaner.models import smollm2_gguf

            source = str(smollm2_gguf())
        tokenizer = load_tokenizer(source)
        prepare_tokenizer(tokenizer, fmt)
        per_example = sum(len(tokenise(r, tokenizer, fmt, recipe.max_length).input_ids)
                          for r in sample) / len(sample)
        how = f"tokenizer {source.rsplit('/', 1)[-1]}"
    except Exception as error:  # no tokenizer offline: characters, capped at max_length
        log.warning("cannot load the base model's tokenizer (%s): counting characters", error)
        cpt = config.budget.chars_per_token
        per_example = sum(min(recipe.max_length, (len(r["instruction"]) + len(r["input"])
                                                  + len(r["output"])) / cpt)
                          for r in sample) / len(sample)
        how = f"{cpt:.2f} chars/token"
    curated = min(config.select.size, pool.num_rows)
    arms = [("curated", curated, f"at most select.size = {config.select.size:,} examples")]
    baseline = config.finetune.baseline
    if baseline == "random":
        arms.append(("baseline", curated, "a random subset of the curated set's size"))
    elif baseline == "pool":
        arms.append(("baseline", pool.num_rows, "the whole pool"))
    return [FinetunePlan(arm, n, recipe.epochs, round(per_example, 1),
                         round(per_example * n * recipe.epochs), how, note)
            for arm, n, note in arms]


# ---- the whole run -----------------------------------------------------------------------------
def llm_stages(config: GleanerConfig) -> list[LLMStage]:
    """The engine LLM stages curate runs over the ingested pool, as configured: each stage
    registers how it is planned (``register("planned_stage", name)``: the stage for a config,
    or None when the config does not run it)."""
    from gleaner.registry import registry

    made = (plan(config) for _, plan in registry("planned_stage").items())
    return [stage for stage in made if stage is not None]


def run_plan(store: Store, run_id: str, config: GleanerConfig, input_store: Store,
             stages: Callable[[GleanerConfig], list[LLMStage]] = llm_stages) -> dict[str, Any]:
    """The plan of ``run_id`` whose ingested pool is in ``input_store`` (the run's store, or
    a scratch one for a plan made before ingesting)."""
    runs = {layout.RATE, layout.SCORE, *config.curate.signals}  # what curate runs
    entries = [p for stage in stages(config) if stage.name in runs
               for p in plan_stage(stage, store, run_id, input_store, config)]
    if config.curate.evaluate:
        entries += plan_judge(config) + plan_likert(config)
    pool = input_store.read_stage(run_id, layout.INGEST) if input_store.has_stage(
        run_id, layout.INGEST) else pa.table({})
    finetunes = plan_finetunes(config, pool)
    known = [e for e in entries if e.priced]
    plan: dict[str, Any] = {
        "run_id": run_id, "made_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "examples": pool.num_rows,
        "stages": [{**asdict(e), "usd": e.usd} for e in entries],
        "finetunes": [asdict(f) for f in finetunes],
        "total_usd": round(sum(e.usd or 0.0 for e in known), 6),
        "total_sync_usd": round(sum(e.sync_usd or 0.0 for e in known), 6),
        "total_batch_usd": round(sum(e.batch_usd or 0.0 for e in known), 6),
        "unpriced": sorted({e.model for e in entries if not e.priced}),
        "max_usd": config.budget.max_usd,
    }
    plan["over_budget"] = bool(config.budget.max_usd is not None
                               and plan["total_usd"] > config.budget.max_usd)
    return plan


@contextmanager
def scratch_ingest(sources: Sequence[str], config: GleanerConfig, run_id: str
                   ) -> Iterator[Store]:
    """The sources ingested into a memory store: the pool a run would rate, nothing written."""
    from gleaner.tasks.ingest.ingest import run_ingest

    scratch = Store(f"memory://gleaner-plan-{uuid.uuid4().hex[:12]}")
    try:
        run_ingest(list(sources), scratch, run_id, config)
        yield scratch
    finally:
        scratch.fs.rm(scratch.root, recursive=True)


def plan_sources(sources: Sequence[str], config: GleanerConfig, run_id: str) -> dict[str, Any]:
    """The plan of curating ``sources`` as run ``run_id`` (``gleaner plan``, ``--dry-run``)."""
    store = Store(config.store.url, config.store.options)
    with scratch_ingest(sources, config, run_id) as scratch:
        return {**run_plan(store, run_id, config, scratch), "sources": list(sources)}


def plan_run(store: Store, run_id: str, config: GleanerConfig) -> dict[str, Any]:
    """The plan of a run already ingested (curate's, when no plan came with it). A plan that
    cannot be made is recorded with its error, unless there is a budget to keep."""
    try:
        return run_plan(store, run_id, config, store)
    except Exception as error:
        if config.budget.max_usd is not None:
            raise
        log.warning("no cost plan for run %s: %s: %s", run_id, type(error).__name__, error)
        return {"run_id": run_id, "error": f"{type(error).__name__}: {error}", "examples": 0,
                "stages": [], "finetunes": [], "total_usd": None, "total_sync_usd": None,
                "total_batch_usd": None, "unpriced": [], "max_usd": None, "over_budget": False}
