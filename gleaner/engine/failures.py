"""How a stage fails: rows that failed, batches that failed, and stages that must stop.

- A row that failed (unparseable answer, an error after the client's retries) is
  a row with ``status = failed``, its error and its kind; never a gap.
- A batch whose every row failed transiently (endpoint down, quota) raises
  :class:`BatchUnavailable`, so Prefect retries the batch later; after the last
  retry the engine writes the batch as failed rows.
- An error no retry can fix for the whole run (the key is rejected, the model
  does not exist, the local server gleaner started has died) raises
  :class:`FatalStageError` at the first occurrence: the batch is not retried,
  no further batch is submitted, and the stage fails with that cause in plain words.
- A stage whose failed share exceeds its ``max_failed_share`` ends with
  :class:`StageFailed` after writing every row and its summary.
"""

from __future__ import annotations


class BatchUnavailable(RuntimeError):
    """Every row of a batch failed for a reason that may pass: retry the batch later."""


class FatalStageError(RuntimeError):
    """Nothing in this stage can succeed until a person acts (key, model, dead server)."""

    def __init__(self, message: str, kind: str = "fatal"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # keeps ``kind`` across Ray/Prefect
        return (type(self), (str(self), self.kind))


class StageFailed(RuntimeError):
    """The stage ran, but failed more rows than its failure budget allows."""


def is_fatal(error: BaseException | None) -> bool:
    return isinstance(error, FatalStageError)


def retry_unless_fatal(task: object, task_run: object, state: object) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed batch unless its cause is fatal."""
    try:
        state.result(raise_on_failure=True)  # type: ignore[attr-defined]
    except FatalStageError:
        return False
    except Exception:
        return True
    return True


def check_budget(stage: str, failed: int, total: int, budget: float) -> None:
    if total and failed / total > budget:
        raise StageFailed(
            f"{stage}: {failed:,} of {total:,} rows failed ({failed / total:.1%}), more than "
            f"the failure budget of {budget:.1%}; every row is written (status=failed with "
            f"the error); fix the cause and rerun with --retry-failed"
        )
