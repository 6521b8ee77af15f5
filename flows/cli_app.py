"""The typer application every command module registers on, and helpers they share."""

from __future__ import annotations

import contextvars
import json
import sys
from pathlib import Path
from typing import Any

import click
import typer
from typer.core import TyperGroup

from gleaner.config import GleanerConfig, load_config

# `gleaner --help` lists the verbs in the order a user meets them, grouped by stage of life.
LIFECYCLE: dict[str, tuple[str, ...]] = {
    "Make data": ("ingest", "generate", "regenerate", "evol"),
    "Judge it": ("rate", "score", "embed", "ifd", "length", "compare", "reward", "scorer"),
    "Choose": ("select", "preferences", "publish"),
    "Prove": ("finetune", "dpo", "evaluate", "mt-bench", "experiment"),
    "Operate": ("curate", "plan", "runs", "approve", "view", "doctor", "config"),
}


def lifecycle() -> dict[str, list[str]]:
    """:data:`LIFECYCLE` with every registered pool stage's verb at the end of its panel."""
    from gleaner.engine.catalog import pool_stages

    panels = {panel: list(verbs) for panel, verbs in LIFECYCLE.items()}
    for entry in pool_stages().values():
        panels[entry.panel].append(entry.verb)
    return panels


def places() -> dict[str, tuple[str, int]]:
    return {verb: (panel, i) for i, (panel, verb) in enumerate(
        (panel, verb) for panel, verbs in lifecycle().items() for verb in verbs)}


class LifecycleGroup(TyperGroup):
    """Lists the verbs in life-cycle order (commands and groups alike)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        place = places()
        return sorted(super().list_commands(ctx), key=lambda name: place[name][1])

    def invoke(self, ctx: click.Context) -> Any:
        """A store that cannot be reached or written is one line from every verb, naming
        the store and the cause (gleaner.store.store_failure), never a traceback."""
        from gleaner.store import StoreUnavailable, store_failure

        token = STORE_URL.set(None)
        try:
            return super().invoke(ctx)
        except StoreUnavailable as error:
            fail(str(error), code=1)
        except Exception as error:
            own = type(error).__module__.split(".")[0] in ("typer", "click")  # exits, usage
            cause = None if own else store_failure(error)
            if cause is None:
                raise
            fail(f"cannot use store {STORE_URL.get() or 'of this run'}: {cause}", code=1)
        finally:
            STORE_URL.reset(token)


def arrange_commands(application: typer.Typer) -> None:
    """Give every registered verb its panel; a verb with no place in the life-cycle is an
    error here, not a command that silently lands somewhere."""
    place = places()
    for entry in [*application.registered_commands, *application.registered_groups]:
        if entry.name not in place:
            raise RuntimeError(f"CLI verb {entry.name!r} has no place in cli_app.LIFECYCLE")
        entry.rich_help_panel = place[entry.name][0]


app = typer.Typer(
    cls=LifecycleGroup,
    name="gleaner",
    help="Curate instruction-tuning data: ingest, rate, score, embed, select, finetune, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold API keys
)

ConfigOption = typer.Option(
    None, "--config", "-c", help="YAML config file.", exists=True, dir_okay=False
)
StoreOption = typer.Option(
    None, "--store", help="Store URL: a folder, s3://bucket/prefix, any fsspec URL."
)
RunIdOption = typer.Option(None, "--run-id", help="Run id (generated when not given).")
JsonOption = typer.Option(False, "--json", help="Print one JSON object instead of a human summary.")
ForceOption = typer.Option(
    False, "--force", help="Start the stage afresh: ignore the cache and this run's parts."
)
NoCacheOption = typer.Option(False, "--no-cache", help="Do not reuse rows made by other runs.")
RetryFailedOption = typer.Option(
    False, "--retry-failed", help="Redo only the rows of this run that failed."
)
InputRunOption = typer.Option(..., "--run-id", help="The run whose ingested examples to use.")
RowsPerBatchOption = typer.Option(None, "--batch-size", min=1, help="Examples per batch.")
ActorsOption = typer.Option(None, "--actors", min=1, help="Ray actors in the pool.")
NumGpusOption = typer.Option(None, "--num-gpus", min=0, help="GPUs per actor.")
TrainGpusOption = typer.Option(
    None, "--num-gpus", min=1, help="Train on this many GPUs: one Ray Train worker each.")


def training_gpus(num_gpus: int | None, num_workers: int | None, gpu: bool | None
                  ) -> tuple[int | None, bool | None]:
    """(workers, use_gpu) of a training verb's --num-gpus, --num-workers and --gpu/--cpu."""
    if num_gpus is None:
        return num_workers, gpu
    if gpu is False:
        fail("--num-gpus trains on GPUs: drop --cpu")
    if num_workers is not None and num_workers != num_gpus:
        fail(f"--num-gpus {num_gpus} means {num_gpus} workers (one GPU each): drop "
             f"--num-workers {num_workers}")
    return num_gpus, True
BatchAPIOption = typer.Option(
    False, "--batch-api", help="Send the requests through the provider's Batch API: half the "
    "price, answers within 24h (the driver polls; a rerun resumes the same batches)."
)


def stage_flags(section: str, force: bool, no_cache: bool, retry_failed: bool) -> dict[str, Any]:
    """The engine's per-stage switches as config overrides (None = as configured)."""
    return {
        f"{section}.force": True if force else None,
        f"{section}.cache": False if no_cache else None,
        f"{section}.retry_failed": True if retry_failed else None,
    }


def choice(kind: str, value: str | None, flag: str) -> str | None:
    """A CLI choice checked against its registry (the message lists the known names)."""
    if value is None:
        return None
    from gleaner.registry import registry

    if value not in registry(kind):
        fail(f"{flag} must be one of {', '.join(registry(kind).names())}, not {value!r}")
    return value


def run_or_fail(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a stage; what a person must act on exits with its message (2: usage, 1: the run)."""
    from gleaner.engine import FatalStageError, LeaseHeld, PlanMismatch, StageFailed
    from gleaner.llm.local_server import LocalServerError
    from gleaner.store import store_failure

    try:
        return call(*args, **kwargs)
    except Exception as error:
        if store_failure(error) is not None:
            raise  # LifecycleGroup.invoke says it in one line, naming the store
        if isinstance(error, PlanMismatch | FileNotFoundError | ValueError):
            fail(str(error), code=2)
        if isinstance(error, FatalStageError | StageFailed | LeaseHeld | LocalServerError
                      | RuntimeError):
            fail(str(error), code=1)
        raise


# the store the running verb uses (build_config), for the one line a store error becomes
STORE_URL: contextvars.ContextVar[str | None] = contextvars.ContextVar("gleaner_store_url",
                                                                      default=None)


def build_config(config_file: Path | None, check_store: bool = True, **overrides: Any
                 ) -> GleanerConfig:
    """Config file, then CLI flags (dotted keys; None = not given). Errors exit with a message.

    ``check_store``: a store that cannot be reached or written stops the verb here, in one
    line (gleaner.store.StoreUnavailable), before any flow starts."""
    try:
        config = load_config(config_file, overrides)
    except ValueError as error:
        fail(str(error))
        raise  # unreachable; keeps type checkers content
    STORE_URL.set(config.store.url)
    if check_store:
        from gleaner.store import Store, StoreUnavailable

        try:
            Store.check(config.store.url, config.store.options)
        except StoreUnavailable as error:
            fail(str(error), code=1)
    return config


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"gleaner: error: {message}", err=True)
    raise typer.Exit(code)


def emit(summary: dict[str, Any], as_json: bool, human: str) -> None:
    """One JSON object on stdout with --json; the human text otherwise."""
    if as_json:
        sys.stdout.write(json.dumps(summary, sort_keys=True, default=str) + "\n")
    else:
        typer.echo(human)


@app.callback()
def _group() -> None:
    """Curate instruction-tuning data: ingest, rate, score, embed, select, finetune, evaluate."""
    # A callback keeps `gleaner <command>` a command group even while only one command is
    # registered (typer would otherwise run that command directly and treat its name as an arg).
