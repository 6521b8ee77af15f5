"""What happens when a curate run's selection is done: a dataset version, the counts, the event.

The version is published as a Prefect task (retried alone; idempotent per run),
the counts table a person reads first becomes an artifact, and the
``gleaner.selection.completed`` event is what the finetune and evaluate
deployment triggers listen for (prefect.yaml).
"""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc
from prefect import task

from gleaner import layout
from gleaner.config import GleanerConfig
from gleaner.engine.step import Step, run_step
from gleaner.schema import EXAMPLE_SCHEMA
from gleaner.store import Store
from gleaner.tasks.publish.versions import (
    diff_ingest,
    ids_digest,
    latest_version,
    list_versions,
    publish_dataset_version,
)

SELECTION_COMPLETED = "gleaner.selection.completed"


def previous_run(store: Store, dataset_name: str, run_id: str) -> str | None:
    """The run that published the latest version of this dataset (for the refresh diff)."""
    latest = latest_version(store, dataset_name)
    if latest is None or latest["run_id"] == run_id:
        return None
    return latest["run_id"]


@task(name="publish-dataset-version")
def publish_version(config: GleanerConfig, run_id: str, stats: dict[str, Any],
                    again: bool = False) -> dict[str, Any]:
    store = Store(config.store.url, config.store.options)
    selected = store.read_stage(run_id, layout.CURATED, schema=EXAMPLE_SCHEMA)
    return publish_dataset_version(store, config.curate.dataset_name, run_id, selected, stats,
                                   again=again)


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


class PublishStep(Step):
    """The dataset version of a run's selection: its key is the dataset, its input the curated
    set (its example ids). Done when the run has published a version of those examples; a
    rerun then sends no event. Other examples (another selection of the run), or ``force``,
    are published as a new version; a publish killed before its record finds its version."""

    kind = "publish"
    force_hint = "another --run-id"
    artifact = "curate"  # the table a person reads first, named after the run
    description = "where every example went"

    def __init__(self, config: GleanerConfig, store: Store, run_id: str,
                 summary: dict[str, Any], before: str | None, force: bool = False):
        self.config, self.summary, self.before, self.force = config, summary, before, force
        self.run_id = run_id
        ids = store.read_stage(run_id, layout.CURATED, columns=["id"]).column("id")
        self.curated = ids_digest(pc.unique(ids.combine_chunks()) if ids.num_chunks else ids)

    def settings(self) -> dict[str, Any]:
        return {"dataset": self.config.curate.dataset_name}

    def inputs(self) -> dict[str, Any]:
        return {"curated": self.curated}  # another selection: published as a new version

    def mine(self, store: Store, run_id: str) -> list[dict[str, Any]]:
        return [v for v in list_versions(store, self.config.curate.dataset_name)
                if v["run_id"] == run_id]

    def done(self, store: Store, run_id: str) -> bool:
        return any(v.get("ids_sha256") == self.curated for v in self.mine(store, run_id))

    def run(self, store: Store, run_id: str, *, resume: bool) -> dict[str, Any]:
        rate = self.summary.get("rate") or {}
        mine = self.mine(store, run_id)
        published = next((v for v in reversed(mine) if v.get("ids_sha256") == self.curated),
                         None)
        if published is not None and not self.force:
            version = published  # published before its record was written: not again
        else:
            version = publish_version(self.config, run_id, {
                "requests_sent": rate.get("requests", 0),
                "requests_saved": rate.get("cached", 0)}, again=self.force or bool(mine))
        out: dict[str, Any] = {"dataset": version}
        if self.before is not None:
            out["pool_diff"] = diff_ingest(store, self.before, run_id, stage=layout.INGEST)
        announce_selection(self.config, run_id, version)
        return out

    def markdown(self, summary: dict[str, Any]) -> str:
        return counts_markdown(self.run_id, {**self.summary, **summary})


def release(config: GleanerConfig, run_id: str, summary: dict[str, Any],
            before: str | None, force: bool = False) -> dict[str, Any]:
    """Publish the version, diff the pool against the previous run, announce, show the counts
    (a step: done once per run and curated set)."""
    store = Store(config.store.url, config.store.options)
    out = run_step(store, run_id, PublishStep(config, store, run_id, summary, before, force),
                   force=force)
    return {"dataset": out["dataset"], **({"pool_diff": out["pool_diff"]}
                                          if "pool_diff" in out else {})}
