"""Near-duplicate removal (MinHash LSH): registered here once written."""

from __future__ import annotations
