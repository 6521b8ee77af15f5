"""Every path and file name of the store layout, in one place.

    <root>/runs/<run_id>/run.json                          the run record
    <root>/runs/<run_id>/<stage>/part-NNNNN.parquet        a stage's output, one part per batch
    <root>/runs/<run_id>/<stage>/_plan.json                the settings the parts were made with
    <root>/runs/<run_id>/<stage>/_summary.json             counts, tokens, cost of the stage
    <root>/runs/<run_id>/_leases/<stage>.json              who runs a stage now (heartbeat)
    <root>/runs/<run_id>/report/...                        the selection report
    <root>/runs/<run_id>/finetune/<model>/{model,ray,metrics.json,summary.json}
    <root>/runs/<run_id>/evaluate/answers/<model>/<test set>.parquet
    <root>/runs/<run_id>/evaluate/<a>-vs-<b>/{pairs,judge}/<test set>/...   a stage each
    <root>/runs/<run_id>/evaluate/<a>-vs-<b>/{report.md,wtl.png,summary.json,unmatched.json}
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

RUN_RECORD = "run.json"
PLAN_FILE = "_plan.json"
SUMMARY_FILE = "_summary.json"


def stage_dir(store: Store, run_id: str, stage: str) -> str:
    return store.run_path(run_id, stage)


def plan_path(store: Store, run_id: str, stage: str) -> str:
    return posixpath.join(stage_dir(store, run_id, stage), PLAN_FILE)


def summary_path(store: Store, run_id: str, stage: str) -> str:
    return posixpath.join(stage_dir(store, run_id, stage), SUMMARY_FILE)


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


# ---- evaluation -------------------------------------------------------------------------------
def answers_path(store: Store, run_id: str, label: str, test_set: str) -> str:
    return store.run_path(run_id, "evaluate", "answers", label, f"{test_set}.parquet")


def answers_dir(store: Store, run_id: str, label: str) -> str:
    return store.run_path(run_id, "evaluate", "answers", label)


def comparison_dir(store: Store, run_id: str, comparison: str) -> str:
    return store.run_path(run_id, "evaluate", comparison)


def pairs_stage(comparison: str, test_set: str) -> str:
    """The stage holding one test set's answer pairs (the judge stage's input)."""
    return f"evaluate/{comparison}/pairs/{test_set}"


def judge_stage(comparison: str, test_set: str) -> str:
    return f"evaluate/{comparison}/judge/{test_set}"


# ---- datasets ---------------------------------------------------------------------------------
def dataset_dir(store: Store, name: str) -> str:
    """A published dataset's folder (the name is checked by gleaner.tasks.publish.versions)."""
    return store.path("datasets", name)
