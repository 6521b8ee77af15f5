"""CLI command modules; each decorates functions onto ``flows.cli_app.app``.

Add one import line per module here.
"""

from gleaner.flows.commands import (
    curate,  # noqa: F401
    deita,  # noqa: F401
    doctor,  # noqa: F401
    ingest,  # noqa: F401
    rate,  # noqa: F401
    train_eval,  # noqa: F401
)
