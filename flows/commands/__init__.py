"""CLI command modules; each decorates functions onto ``flows.cli_app.app``.

Add one import line per module here.
"""

from gleaner.flows.commands import (
    approve,  # noqa: F401
    compare,  # noqa: F401
    config,  # noqa: F401
    curate,  # noqa: F401
    deita,  # noqa: F401
    doctor,  # noqa: F401
    dpo,  # noqa: F401
    evol,  # noqa: F401
    experiment,  # noqa: F401
    generate,  # noqa: F401
    ingest,  # noqa: F401
    mt_bench,  # noqa: F401
    plan,  # noqa: F401
    preferences,  # noqa: F401
    publish,  # noqa: F401
    rate,  # noqa: F401
    reward,  # noqa: F401
    runs,  # noqa: F401
    signals,  # noqa: F401
    train_eval,  # noqa: F401
    view,  # noqa: F401
)
