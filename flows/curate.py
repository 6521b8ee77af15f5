"""The curate flow: ingest → rate → (score, embed) → select → dataset version → finetune, evaluate.

Every stage is a subflow of one ``curate`` flow run, so the Prefect UI shows the
whole refresh in one place, and every stage skips what the store already holds,
so rerunning a run id resumes it. When selection completes the flow emits the
``gleaner.selection.completed`` event. In the embedded default it then runs
fine-tuning and evaluation itself (subflows); with ``curate.downstream: event``
it stops there and the deployment triggers in prefect.yaml start the
``finetune`` and ``evaluate`` deployments on their own work pools.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from gleaner.artifacts import artifact_key as shared_artifact_key
from gleaner.config import GleanerConfig, load_config
from gleaner.runs import new_run_id, read_run, record_run
from gleaner.runtime import init_ray
from gleaner.store import Store

SELECTION_COMPLETED = "gleaner.selection.completed"


def resolve_config(
    config: str | dict[str, Any] | GleanerConfig | None, store: str | None
) -> GleanerConfig:
    """A deployment passes a YAML path or a dict; the CLI passes a built config."""
    if isinstance(config, GleanerConfig):
        base = config
    elif isinstance(config, dict):
        base = GleanerConfig.model_validate(config)
    else:
        base = load_config(config)
    return base.with_overrides({"store.url": store})


@contextlib.contextmanager
def offline_endpoints(config: GleanerConfig) -> Iterator[GleanerConfig]:
    """Start the offline llama.cpp server once when the rater or the judge has no endpoint."""
    needs_rater = config.rate.endpoint.base_url is None
    needs_judge = config.curate.evaluate and config.evaluate.judge.base_url is None
    if not (needs_rater or needs_judge):
        yield config
        return
    from gleaner.llm.local_server import local_llm_server

    with local_llm_server(q4_0=config.rate.offline_q4_0) as server:
        overrides: dict[str, Any] = {}
        if needs_rater:
            overrides |= {
                "rate.endpoint.base_url": server.base_url,
                "rate.endpoint.model": server.model,
                "rate.mode": config.rate.mode or "score-only",
                "rate.endpoint.concurrency": min(config.rate.endpoint.concurrency, 2),
            }
        live = config.with_overrides(overrides)
        if needs_judge:
            from gleaner.flows.evaluate_flow import with_offline_judge

            live = with_offline_judge(live, server.base_url, server.model)
        yield live


def check_evaluation_inputs(config: GleanerConfig) -> None:
    """Before ingesting: every test set the evaluation will read resolves to a readable file.

    Evaluation comes last, after rating and fine-tuning; a test-set path that
    does not resolve (a relative ``eval_sets_dir`` read from another directory)
    would otherwise fail the run only then. Checked when this flow runs the
    evaluation itself (``curate.downstream: subflow``): with ``event`` the
    evaluate deployment reads them on its own worker, from its own directory.
    """
    if not (config.curate.evaluate and config.curate.downstream == "subflow"):
        return
    from gleaner.tasks.evaluate.eval_sets import check_readable

    check_readable(config.evaluate.test_sets, config.evaluate.eval_sets_dir)


def previous_run(store: Store, dataset_name: str, run_id: str) -> str | None:
    """The run that published the latest version of this dataset (for the refresh diff)."""
    from gleaner.tasks.publish.versions import latest_version

    latest = latest_version(store, dataset_name)
    if latest is None or latest["run_id"] == run_id:
        return None
    return latest["run_id"]


def counts_markdown(run_id: str, summary: dict[str, Any]) -> str:
    """The table a person reads first: where every example went."""
    ingest, rate, select = summary["ingest"], summary.get("rate") or {}, summary["select"]
    rows = [
        ("read", ingest["read"]),
        ("quarantined", ingest["quarantined"]),
        ("duplicates", ingest["duplicates"]),
        ("kept after ingest", ingest["kept"]),
        ("rated ok", rate.get("rated", "—")),
        ("rating failed", rate.get("failed", "—")),
        ("rating ≥ threshold", rate.get("kept", "—")),
    ]
    rows += [(f"select: {reason}", n) for reason, n in sorted(select["reasons"].items())]
    rows.append(("selected", select["selected"]))
    lines = [f"# Curate {run_id}", "", "| what | examples |", "|---|---:|"]
    lines += [f"| {what} | {n:,} |" if isinstance(n, int) else f"| {what} | {n} |"
              for what, n in rows]
    cost = rate.get("est_cost_usd")
    tokens = (rate.get("prompt_tokens", 0), rate.get("completion_tokens", 0))
    lines += ["", f"Rating tokens: {tokens[0]:,} prompt + {tokens[1]:,} completion"]
    if cost is not None:
        lines.append(f"Estimated rating cost: ${cost:,.4f}")
    version = summary.get("dataset")
    if version:
        diff = version["diff"]
        lines += [
            "",
            f"Dataset **{version['name']} {version['label']}**: {version['counts']['examples']:,} "
            f"examples; vs previous: +{diff['added']:,} / -{diff['removed']:,} / "
            f"={diff['unchanged']:,}",
        ]
    return "\n".join(lines)


def artifact_key(run_id: str) -> str:
    return shared_artifact_key("curate", run_id)


@task(name="publish-dataset-version")
def publish_version(config: GleanerConfig, run_id: str, stats: dict[str, Any]) -> dict[str, Any]:
    from gleaner.flows.deita_flow import CURATED_STAGE
    from gleaner.schema import EXAMPLE_SCHEMA
    from gleaner.tasks.publish.versions import publish_dataset_version

    store = Store(config.store.url, config.store.options)
    selected = store.read_stage(run_id, CURATED_STAGE, schema=EXAMPLE_SCHEMA)
    return publish_dataset_version(store, config.curate.dataset_name, run_id, selected, stats)


def announce_selection(config: GleanerConfig, run_id: str, version: dict[str, Any]) -> None:
    """The event the finetune and evaluate deployment triggers listen for."""
    emit_event(
        event=SELECTION_COMPLETED,
        resource={"prefect.resource.id": f"gleaner.run.{run_id}", "gleaner.run-id": run_id},
        payload={
            "run_id": run_id,
            "store": config.store.url,
            "dataset": version["uri"],
            "dataset_name": version["name"],
            "version": version["version"],
            "selected": version["counts"]["examples"],
            "config": config.model_dump(mode="json"),
        },
    )


@flow(name="curate", flow_run_name="curate-{run_id}", validate_parameters=False)
def curate_flow(
    sources: list[str],
    store: str | None = None,
    config: str | dict[str, Any] | GleanerConfig | None = None,
    run_id: str | None = None,
    train: bool | None = None,
    evaluate: bool | None = None,
) -> dict[str, Any]:
    """Curate ``sources`` into a new dataset version; fine-tune and evaluate when asked."""
    from gleaner.flows.deita_flow import run_embed, run_score, run_select
    from gleaner.flows.ingest_flow import ingest_flow
    from gleaner.flows.rate_flow import rate_flow

    logger = get_run_logger()
    cfg = resolve_config(config, store).with_overrides(
        {"curate.train": train, "curate.evaluate": evaluate}
    )
    run_id = run_id or cfg.run_id or new_run_id()
    cfg = cfg.with_overrides({"run_id": run_id})
    check_evaluation_inputs(cfg)
    # One Ray for every stage. The CLI starts it (execution_environment); a deployment run
    # by a Prefect worker has no CLI around it, and RayTaskRunner's own ray.init() would join
    # whatever cluster /tmp/ray last named, then shut Ray down after each stage.
    init_ray(cfg)
    st = Store(cfg.store.url, cfg.store.options)
    before = previous_run(st, cfg.curate.dataset_name, run_id)
    record_run(st, run_id, cfg, flow="curate", sources=list(sources))
    summary: dict[str, Any] = {"run_id": run_id, "store": cfg.store.url}

    summary["ingest"] = ingest_flow(list(sources), run_id=run_id, config=cfg)
    with offline_endpoints(cfg) as live:
        summary["rate"] = rate_flow(run_id=run_id, config=live)
        summary["score"] = run_score(st, run_id, live)
        summary["embed"] = run_embed(st, run_id, live)
        summary["select"] = run_select(st, run_id, live)
        requests = summary["rate"].get("requests", 0)
        stats = {
            "requests_sent": requests,
            "requests_saved": summary["rate"].get("cached", 0),
        }
        version = publish_version(live, run_id, stats)
        summary["dataset"] = version
        if before is not None:
            from gleaner.tasks.publish.versions import diff_ingest

            summary["pool_diff"] = diff_ingest(st, before, run_id, stage="ingest")
        announce_selection(live, run_id, version)
        create_markdown_artifact(
            key=artifact_key(run_id),
            markdown=counts_markdown(run_id, summary),
            description=f"where every example of run {run_id} went",
        )
        logger.info(
            "selected %s of %s examples; dataset %s %s",
            summary["select"]["selected"], summary["ingest"]["read"], version["name"],
            version["label"],
        )

        if cfg.curate.downstream == "subflow":
            if cfg.curate.train:
                from gleaner.flows.finetune_flow import finetune_flow

                summary["finetune"] = finetune_flow(run_id=run_id, config=live)
            if cfg.curate.evaluate:
                from gleaner.flows.evaluate_flow import evaluate_flow

                summary["evaluate"] = evaluate_flow(run_id=run_id, config=live)

    record_run(st, run_id, cfg, curate={k: v for k, v in summary.items() if k != "store"})
    return summary


def curate_record(store: Store, run_id: str) -> dict[str, Any]:
    return read_run(store, run_id).get("curate", {})
