"""What selection shows people: the report as Prefect artifacts, the curated set as a file."""

from __future__ import annotations

from typing import Any

from gleaner import layout
from gleaner.schema import EXAMPLE_SCHEMA
from gleaner.store import Store


def report_markdown(store: Store, report: Any, paths: dict[str, str]) -> str:
    """The selection report, with its score histograms shown (an http store) or linked."""
    figure = paths.get("figure")
    if not figure:
        return report.markdown
    url = store.uri(figure)
    shown = "!" if url.startswith(("http://", "https://")) else ""
    return f"{report.markdown}\n\n{shown}[score histograms (PNG)]({url})"


def export_curated(store: Store, run_id: str, out: str, fmt: str | None) -> dict[str, Any]:
    from gleaner.tasks.publish.export import write_dataset

    return write_dataset(store.read_stage(run_id, layout.CURATED, schema=EXAMPLE_SCHEMA), out,
                         fmt)
