"""Entry point of the ``gleaner`` command: imports every command module so each registers."""

from __future__ import annotations

from gleaner.flows import commands  # noqa: F401  (registers the commands on the app)
from gleaner.flows.cli_app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
