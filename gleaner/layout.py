"""Every path and file name of the store layout, in one place.

    <root>/runs/<run_id>/run.json                          the run record
    <root>/runs/<run_id>/<stage>/part-NNNNN.parquet        a stage's output, one part per batch
    <root>/runs/<run_id>/<stage>/_plan.json                the settings the parts were made with
    <root>/runs/<run_id>/<stage>/_summary.json             counts, tokens, cost of the stage
    <root>/runs/<run_id>/_leases/<stage>.json              who runs a stage now (heartbeat)
    <root>/runs/<run_id>/<stage>/_batch/state.json         Batch API: batches and file ids sent
    <root>/runs/<run_id>/<stage>/_batch/{requests,keys,answers,usage}/...   its files
    <root>/runs/<run_id>/cost_plan.json                    the cost plan made before the run
    <root>/runs/<run_id>/steps/<step>.json                 a step's key, inputs and summary
    <root>/runs/<run_id>/generate/part-NNNNN.parquet       self-instruct round N: its requests
                                                           and their tasks (kept / filtered why)
    <root>/runs/<run_id>/regenerate/part-NNNNN.parquet     teacher answers beside the originals
    <root>/runs/<run_id>/report/...                        the selection report
    <root>/runs/<run_id>/compare/{responses,judge,pairs}/... comparison data (GPT-4-LLM)
    <root>/runs/<run_id>/reward/part-NNNNN.parquet         reward-model score of every example
    <root>/runs/<run_id>/evol/<kind>/part-NNNNN.parquet    EVOL chains of each seed (DEITA)
    <root>/runs/<run_id>/evol/<kind>-items/part-NNNNN.parquet   their (text, score) items
    <root>/runs/<run_id>/finetune/<model>/{model,ray,metrics.json,summary.json}
    <root>/runs/<run_id>/evaluate/answers/<model>/<test set>.parquet
    <root>/runs/<run_id>/evaluate/<a>-vs-<b>/{pairs,judge}/<test set>/...   a stage each
    <root>/runs/<run_id>/evaluate/<a>-vs-<b>/{report.md,wtl.png,summary.json,unmatched.json}
    <root>/runs/<run_id>/evaluate/<a>-vs-<b>/likert/{requests,ratings}/...  LIMA's 1-6 ratings
    <root>/runs/<run_id>/evaluate/answers/<model>/samples/<test set>.parquet  N sampled answers
    <root>/runs/<run_id>/evaluate/mt_bench/answers/<model>.parquet   two-turn MT-Bench answers
    <root>/runs/<run_id>/evaluate/mt_bench/<model>/{requests,grades}/...  the grading stage
    <root>/runs/<run_id>/evaluate/mt_bench/<model>/summary.json     per-category means
    <root>/runs/<run_id>/experiment/<name>/select/<selection>/...   an arm's selection manifest
    <root>/runs/<run_id>/experiment/<name>/{plan.json,arms/<arm>.json,table.md,table.json,
                                            winning_score.png}     the grid and its result
    <root>/cache/<stage>/<key>/<run_id>-NNNNN.parquet      cross-run cache (ok rows by id)
    <root>/datasets/<name>/v<NNNN>/...                     published dataset versions

Stage names may nest (``evaluate/curated-vs-baseline/judge/vicuna``); the files
beside the parts start with ``_`` so a part listing never sees them.
"""

from __future__ import annotations

import posixpath

from gleaner.store import Store

INGEST = "ingest"
QUARANTINE = "quarantine"
DUPLICATES = "duplicates"
RATE = "rate"
SCORE = "score"
EMBED = "embed"
SELECT = "select"
CURATED = "curated"
GENERATE = "generate"  # self-instruct rounds; what they keep becomes the run's ingest
REGENERATE = "regenerate"  # a teacher's answers to the run's ingest
COMPARE_RESPONSES = "compare/responses"  # K responses per prompt (content-hash ids)
COMPARE_JUDGE = "compare/judge"  # each response graded 1-10 (an engine stage)
COMPARE_PAIRS = "compare/pairs"  # (prompt, chosen, rejected, margin) for the reward model
REWARD = "reward"  # the reward model's score of every example
REWARD_MODEL = "reward-model"  # finetune/<name> of the trained reward model

IFD = "ifd"  # L(A|Q), L(A) and IFD of every example (Cherry LLM, Superfiltering)
LENGTH = "length"  # response characters and tokens (Long-is-more)

RUN_RECORD = "run.json"
PLAN_FILE = "_plan.json"
SUMMARY_FILE = "_summary.json"


def stage_dir(store: Store, run_id: str, stage: str) -> str:
    return store.run_path(run_id, stage)


def plan_path(store: Store, run_id: str, stage: str) -> str:
    return posixpath.join(stage_dir(store, run_id, stage), PLAN_FILE)


def summary_path(store: Store, run_id: str, stage: str) -> str:
    return posixpath.join(stage_dir(store, run_id, stage), SUMMARY_FILE)


def batch_dir(store: Store, run_id: str, stage: str) -> str:
    """The Batch API's record of a stage (in the stage: --force clears it with the parts)."""
    return posixpath.join(stage_dir(store, run_id, stage), "_batch")


def batch_state_path(store: Store, run_id: str, stage: str) -> str:
    return posixpath.join(batch_dir(store, run_id, stage), "state.json")


def batch_file(store: Store, run_id: str, stage: str, kind: str, number: int, ext: str) -> str:
    """``requests/NNNNN.jsonl`` (as uploaded), ``keys/NNNNN.parquet`` (its custom ids),
    ``answers/NNNNN.parquet`` (its output and error lines, read back)."""
    return posixpath.join(batch_dir(store, run_id, stage), kind, f"{number:05d}.{ext}")


def batch_usage_path(store: Store, run_id: str, stage: str, index: int) -> str:
    """Which rows of part ``index`` the Batch API answered, and their tokens (batch price)."""
    return posixpath.join(batch_dir(store, run_id, stage), "usage", f"part-{index:05d}.parquet")


def cost_plan_path(store: Store, run_id: str) -> str:
    return store.run_path(run_id, "cost_plan.json")


def lease_path(store: Store, run_id: str, stage: str) -> str:
    """Beside the stage, not in it: --force clears the stage while holding its lease."""
    return store.run_path(run_id, "_leases", stage.replace("/", "--") + ".json")


def run_record(store: Store, run_id: str) -> str:
    return store.run_path(run_id, RUN_RECORD)


def cache_dir(store: Store, stage: str, key: str) -> str:
    """Where ok rows of a stage made with settings ``key`` are kept for later runs."""
    return store.path("cache", stage.replace("/", "-"), key)


def cache_file(directory: str, run_id: str, index: int) -> str:
    return posixpath.join(directory, f"{run_id}-{index:05d}.parquet")


def report_dir(store: Store, run_id: str) -> str:
    return store.run_path(run_id, "report")


# ---- fine-tuning ------------------------------------------------------------------------------
def finetune_dir(store: Store, run_id: str, name: str) -> str:
    return store.run_path(run_id, "finetune", name)


def model_dir(store: Store, run_id: str, name: str) -> str:
    return posixpath.join(finetune_dir(store, run_id, name), "model")


def finetune_file(store: Store, run_id: str, name: str, file: str) -> str:
    """``metrics.json`` / ``summary.json`` / ``ray`` (Ray Train's checkpoints) of a model."""
    return posixpath.join(finetune_dir(store, run_id, name), file)


def scorer_model_name(kind: str) -> str:
    """The finetune/<name> of a trained DEITA scorer (``complexity-scorer``, ``quality-scorer``)."""
    return f"{kind}-scorer"


# ---- learned judges ---------------------------------------------------------------------------
def evol_stage(kind: str) -> str:
    """DEITA's EVOL chains of one kind (complexity or quality)."""
    return f"evol/{kind}"


def evol_items_stage(kind: str) -> str:
    """The (text, score) items of one kind's chains, with their lineage."""
    return f"evol/{kind}-items"


# ---- evaluation -------------------------------------------------------------------------------
def answers_path(store: Store, run_id: str, label: str, test_set: str) -> str:
    return store.run_path(run_id, "evaluate", "answers", label, f"{test_set}.parquet")


def answers_dir(store: Store, run_id: str, label: str) -> str:
    return store.run_path(run_id, "evaluate", "answers", label)


def sampled_answers_path(store: Store, run_id: str, label: str, test_set: str) -> str:
    """Every sampled answer (``sample`` 0..N-1) of one model to one test set (Likert)."""
    return store.run_path(run_id, "evaluate", "answers", label, "samples",
                          f"{test_set}.parquet")


def generation_scope(label: str) -> str:
    """Where one model's test-set answering runs as a stage (``<scope>/requests`` in,
    ``<scope>/answers`` out); the answer files above are what it leaves for people."""
    return f"evaluate/generation/{label}"


def comparison_dir(store: Store, run_id: str, comparison: str) -> str:
    return store.run_path(run_id, "evaluate", comparison)


def pairs_stage(comparison: str, test_set: str) -> str:
    """The stage holding one test set's answer pairs (the judge stage's input)."""
    return f"evaluate/{comparison}/pairs/{test_set}"


def judge_stage(comparison: str, test_set: str) -> str:
    return f"evaluate/{comparison}/judge/{test_set}"


def likert_requests_stage(comparison: str) -> str:
    """Both models' answers to rate on LIMA's scale (the Likert stage's input)."""
    return f"evaluate/{comparison}/likert/requests"


def likert_stage(comparison: str) -> str:
    return f"evaluate/{comparison}/likert/ratings"


# ---- datasets ---------------------------------------------------------------------------------
def dataset_dir(store: Store, name: str) -> str:
    """A published dataset's folder (the name is checked by gleaner.tasks.publish.versions)."""
    return store.path("datasets", name)


# ---- MT-Bench ---------------------------------------------------------------------------------
def mt_bench_answers_path(store: Store, run_id: str, label: str) -> str:
    return store.run_path(run_id, "evaluate", "mt_bench", "answers", f"{label}.parquet")


def mt_bench_requests_stage(label: str) -> str:
    """One model's grading requests (the grade stage's input: rendered prompts, hashed)."""
    return f"evaluate/mt_bench/{label}/requests"


def mt_bench_generation_scope(label: str, turn: int) -> str:
    """One model's answering of one MT-Bench turn (the second asks after the first)."""
    return f"evaluate/mt_bench/{label}/turn-{turn}"


def mt_bench_grades_stage(label: str) -> str:
    return f"evaluate/mt_bench/{label}/grades"


def mt_bench_summary_path(store: Store, run_id: str, label: str) -> str:
    return store.run_path(run_id, "evaluate", "mt_bench", label, "summary.json")


# ---- experiments (the grid) -------------------------------------------------------------------
def experiment_dir(store: Store, run_id: str, name: str) -> str:
    return store.run_path(run_id, "experiment", name)


def experiment_select_stage(name: str, selection: str) -> str:
    """The stage holding one selection's manifest (every pool example, selected and why)."""
    return f"experiment/{name}/select/{selection}"


def experiment_file(store: Store, run_id: str, name: str, file: str) -> str:
    """``plan.json``, ``table.md``, ``table.json``, ``winning_score.png`` of an experiment."""
    return posixpath.join(experiment_dir(store, run_id, name), file)


def experiment_arm_path(store: Store, run_id: str, name: str, arm: str) -> str:
    """An arm's result, written when its subflow finishes (model, W/T/L, bias, MT-Bench)."""
    return posixpath.join(experiment_dir(store, run_id, name), "arms", f"{arm}.json")
