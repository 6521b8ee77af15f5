"""Small JSONL files read whole (seed tasks, test sets, answer files, MT-Bench questions).

One reader so every such file fails the same way: the message names the file and the
line, and the error is the caller's own type (a seed file error, a test-set error, ...).
The pool's own sources go through the streaming readers of the ingest stage instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import fsspec


def json_lines(url: str, error: type[Exception], what: str,
               storage_options: dict[str, Any] | None = None
               ) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """Yield ``(line number, "url, line n", object)`` for each non-blank line of ``url``.

    ``what`` names the file in the messages (``"seed file"``, ``"test set 'vicuna'"``).
    """
    try:
        with fsspec.open(url, "rt", encoding="utf-8", **(storage_options or {})) as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{url}, line {number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as bad:
                    raise error(f"{where}: not valid JSON ({bad.msg})") from None
                if not isinstance(row, dict):
                    raise error(f"{where}: expected a JSON object")
                yield number, where, row
    except FileNotFoundError:
        raise error(f"{what}: file not found: {url}") from None
    except UnicodeDecodeError as bad:
        raise error(f"{what}: {url} is not UTF-8 text ({bad.reason})") from None
