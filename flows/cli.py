"""Entry point of the ``gleaner`` command: imports every command module so each registers."""

from __future__ import annotations

import os
import sys

from gleaner.flows import commands  # noqa: F401  (registers the commands on the app)
from gleaner.flows.cli_app import app, arrange_commands

arrange_commands(app)


def quiet_third_party_bars() -> None:
    """Outside a terminal (logs, CI, a Prefect worker) no library draws progress bars between
    gleaner's own lines: tqdm (transformers' GGUF de-quantising, hub downloads) is switched
    off for this process and, through the environment, for its Ray workers."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def main() -> None:
    quiet_third_party_bars()
    app()


if __name__ == "__main__":
    main()
