"""Prefect artifact keys: one rule for every flow (lowercase letters, digits, dashes)."""

from __future__ import annotations

import re


def artifact_key(*parts: str) -> str:
    """``artifact_key("rate", "summary", run_id)`` -> ``rate-summary-<run id>``, Prefect-safe."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]
