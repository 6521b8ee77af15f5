"""What selection shows people: the report as Prefect artifacts, the curated set as a file."""

from __future__ import annotations

from typing import Any

from gleaner import layout
from gleaner.artifacts import artifact_key
from gleaner.schema import EXAMPLE_SCHEMA
from gleaner.store import Store


def publish_report(run_id: str, store: Store, report: Any, paths: dict[str, str]) -> None:
    from prefect.artifacts import (
        create_image_artifact,
        create_link_artifact,
        create_markdown_artifact,
    )

    create_markdown_artifact(key=artifact_key("select", run_id), markdown=report.markdown,
                             description=f"selection report of run {run_id}")
    figure = paths.get("figure")
    if figure:
        url = store.uri(figure)
        if url.startswith(("http://", "https://")):
            create_image_artifact(image_url=url, key=artifact_key("select-figure", run_id))
        else:
            create_link_artifact(link=url, link_text="score histograms (PNG)",
                                 key=artifact_key("select-figure", run_id))


def export_curated(store: Store, run_id: str, out: str, fmt: str | None) -> dict[str, Any]:
    from gleaner.tasks.publish.export import write_dataset

    return write_dataset(store.read_stage(run_id, layout.CURATED, schema=EXAMPLE_SCHEMA), out,
                         fmt)
