"""``gleaner approve RUN_ID [--reject]``: decide on a curate run waiting to publish."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from gleaner.flows.cli_app import (
    ConfigOption,
    JsonOption,
    StoreOption,
    app,
    build_config,
    emit,
    fail,
)


@app.command("approve")
def approve(
    run_id: str = typer.Argument(..., help="The run waiting for approval (`gleaner runs`)."),
    reject: bool = typer.Option(False, "--reject", help="Do not publish: the current version "
                                "stays current and the run ends not published."),
    comment: str | None = typer.Option(None, "--comment", help="Why; recorded with the "
                                       "decision in the version's card."),
    by: str | None = typer.Option(None, "--by", help="Who decides (default: your user name)."),
    config_file: Path | None = ConfigOption,
    store: str | None = StoreOption,
    as_json: bool = JsonOption,
) -> None:
    """Approve (or --reject) publishing the dataset version of a run waiting for approval
    (publish.approval: required): the run resumes and publishes, or ends not published."""
    from gleaner.runs import read_approval
    from gleaner.runtime import prefect_api
    from gleaner.store import Store, validate_run_id
    from gleaner.tasks.publish.approval import ApprovalError, answer_approval

    try:
        validate_run_id(run_id)
    except ValueError as error:
        fail(str(error))
    config = build_config(config_file, **{"store.url": store})
    st = Store(config.store.url, config.store.options)
    record = read_approval(st, run_id) or {}
    api_url = (config.prefect.api_url or os.environ.get("PREFECT_API_URL")
               or record.get("api_url"))
    if record and not api_url:
        fail(f"run {run_id!r} waits on a Prefect API this command does not know: set "
             "PREFECT_API_URL or prefect.api_url")
    try:
        if api_url:
            with prefect_api(api_url):
                decision = answer_approval(st, run_id, not reject, by=by, comment=comment)
        else:
            decision = answer_approval(st, run_id, not reject, by=by, comment=comment)
    except ApprovalError as error:
        fail(str(error), code=1)
    change = decision["change"]
    current = change["current"]
    against = current["label"] if current else "no version yet"
    verb = "approved" if decision["approved"] else "rejected"
    emit(decision, as_json, "\n".join([
        f"run {run_id}: {verb} by {decision['by']}"
        + (f" ({decision['comment']})" if decision["comment"] else ""),
        f"dataset {decision['dataset']}: +{change['added']} / -{change['removed']} / "
        f"={change['kept']} against {against}",
        f"flow run {decision['flow_run']} resumed: it "
        + ("publishes the version" if decision["approved"] else "ends not published"),
    ]))
