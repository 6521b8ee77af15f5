"""What happens when a curate run's selection is done: a dataset version, the counts, the event.

The version is published as a Prefect task (retried alone; idempotent per run),
the counts table a person reads first becomes an artifact, and the
``gleaner.selection.completed`` event is what the finetune and evaluate
deployment triggers listen for (prefect.yaml).
"""

from __future__ import annotations

from typing import Any

from prefect import task

from gleaner import layout
from gleaner.artifacts import artifact_key
from gleaner.config import GleanerConfig
from gleaner.schema import EXAMPLE_SCHEMA
from gleaner.store import Store
from gleaner.tasks.publish.versions import diff_ingest, latest_version, publish_dataset_version

SELECTION_COMPLETED = "gleaner.selection.completed"


def previous_run(store: Store, dataset_name: str, run_id: str) -> str | None:
    """The run that published the latest version of this dataset (for the refresh diff)."""
    latest = latest_version(store, dataset_name)
    if latest is None or latest["run_id"] == run_id:
        return None
    return latest["run_id"]


@task(name="publish-dataset-version")
def publish_version(config: GleanerConfig, run_id: str, stats: dict[str, Any]) -> dict[str, Any]:
    store = Store(config.store.url, config.store.options)
    selected = store.read_stage(run_id, layout.CURATED, schema=EXAMPLE_SCHEMA)
    return publish_dataset_version(store, config.curate.dataset_name, run_id, selected, stats)


def announce_selection(config: GleanerConfig, run_id: str, version: dict[str, Any]) -> None:
    from prefect.events import emit_event

    emit_event(
        event=SELECTION_COMPLETED,
        resource={"prefect.resource.id": f"gleaner.run.{run_id}", "gleaner.run-id": run_id},
        payload={
            "run_id": run_id, "store": config.store.url, "dataset": version["uri"],
            "dataset_name": version["name"], "version": version["version"],
            "selected": version["counts"]["examples"], "config": config.model_dump(mode="json"),
        },
    )


def counts_markdown(run_id: str, summary: dict[str, Any]) -> str:
    """The table a person reads first: where every example went."""
    ingest, rate, select = summary["ingest"], summary.get("rate") or {}, summary["select"]
    rows = [
        ("read", ingest["read"]), ("quarantined", ingest["quarantined"]),
        ("duplicates", ingest["duplicates"]), ("kept after ingest", ingest["kept"]),
        ("rated ok", rate.get("rated", "—")), ("rating failed", rate.get("failed", "—")),
        ("rating ≥ threshold", rate.get("kept", "—")),
    ]
    rows += [(f"select: {reason}", n) for reason, n in sorted(select["reasons"].items())]
    rows.append(("selected", select["selected"]))
    lines = [f"# Curate {run_id}", "", "| what | examples |", "|---|---:|"]
    lines += [f"| {what} | {n:,} |" if isinstance(n, int) else f"| {what} | {n} |"
              for what, n in rows]
    tokens = (rate.get("prompt_tokens", 0), rate.get("completion_tokens", 0))
    lines += ["", f"Rating tokens: {tokens[0]:,} prompt + {tokens[1]:,} completion"]
    if rate.get("est_cost_usd") is not None:
        lines.append(f"Estimated rating cost: ${rate['est_cost_usd']:,.4f}")
    version = summary.get("dataset")
    if version:
        diff = version["diff"]
        lines += ["", f"Dataset **{version['name']} {version['label']}**: "
                  f"{version['counts']['examples']:,} examples; vs previous: +{diff['added']:,} / "
                  f"-{diff['removed']:,} / ={diff['unchanged']:,}"]
    return "\n".join(lines)


def release(config: GleanerConfig, run_id: str, summary: dict[str, Any],
            before: str | None) -> dict[str, Any]:
    """Publish the version, diff the pool against the previous run, announce, show the counts."""
    from prefect.artifacts import create_markdown_artifact

    rate = summary.get("rate") or {}
    version = publish_version(config, run_id, {"requests_sent": rate.get("requests", 0),
                                               "requests_saved": rate.get("cached", 0)})
    out: dict[str, Any] = {"dataset": version}
    if before is not None:
        store = Store(config.store.url, config.store.options)
        out["pool_diff"] = diff_ingest(store, before, run_id, stage=layout.INGEST)
    announce_selection(config, run_id, version)
    create_markdown_artifact(key=artifact_key("curate", run_id),
                             markdown=counts_markdown(run_id, {**summary, **out}),
                             description=f"where every example of run {run_id} went")
    return out
