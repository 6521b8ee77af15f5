"""The provider's Batch API through the openai SDK: files up, batches created, polled, read.

OpenAI's Batch API (SPEC §10): a JSONL file of requests, each with a
``custom_id``, uploaded with purpose ``batch`` (``/v1/files``); a batch made of
it (``/v1/batches``, ``completion_window`` 24h) and polled until ``completed``,
``failed``, ``expired`` or ``cancelled``; the answers come back as an output file
and an error file, matched by ``custom_id``. Errors are named the way the
synchronous client names them (:func:`gleaner.llm.client.classify_error`): a
rejected key, or a file or batch the endpoint does not have (404), is fatal; a 5xx
after the SDK's retries is transient; no message carries the key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai

from gleaner.config import EndpointConfig
from gleaner.llm.client import LLMError, classify_error, describe_error

TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass(frozen=True)
class Line:
    """One line of an output or error file."""

    custom_id: str
    status_code: int | None
    body: str | None  # the response body as JSON text
    error_code: str | None
    error_message: str | None


class BatchAPI:
    """One endpoint's files and batches (a synchronous SDK client: the driver polls)."""

    def __init__(self, endpoint: EndpointConfig):
        if not endpoint.base_url:
            raise ValueError("the Batch API needs an endpoint base_url")
        self.endpoint = endpoint
        self._client = openai.OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key(),
                                     timeout=endpoint.timeout_s,
                                     max_retries=endpoint.max_retries)

    def __repr__(self) -> str:  # never the key
        return f"BatchAPI(base_url={self.endpoint.base_url!r})"

    def close(self) -> None:
        self._client.close()

    def _call(self, what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except openai.NotFoundError as error:  # a file or batch, not the model, is missing
            detail = describe_error(error, [self.endpoint.api_key()])
            raise LLMError(f"Batch API {what}: {self.endpoint.base_url} has no such object "
                           f"({detail}): the file or batch is gone (expired or deleted), or "
                           "the endpoint offers no Batch API (/v1/files, /v1/batches)",
                           attempts=1, transient=False, kind="batch_not_found",
                           fatal=True) from None
        except openai.APIError as error:
            named = classify_error(self.endpoint, error, 1)
            raise LLMError(f"Batch API {what}: {named}", attempts=named.attempts,
                           transient=named.transient, kind=named.kind,
                           fatal=named.fatal) from None

    def upload(self, name: str, data: bytes) -> str:
        """A request file (purpose ``batch``); returns its file id."""
        file = self._call("upload", self._client.files.create,
                          file=(name, data, "application/jsonl"), purpose="batch")
        return file.id

    def create(self, input_file_id: str, url: str, window: str,
               metadata: dict[str, str]) -> Any:
        return self._call("create", self._client.batches.create, input_file_id=input_file_id,
                          endpoint=url, completion_window=window, metadata=metadata)

    def find(self, input_file_id: str) -> Any | None:
        """The batch made of this file, if one was created (a driver killed right after
        creating it had no time to record its id)."""
        page = self._call("list", self._client.batches.list, limit=100)
        for batch in page:
            if batch.input_file_id == input_file_id:
                return batch
        return None

    def retrieve(self, batch_id: str) -> Any:
        return self._call("retrieve", self._client.batches.retrieve, batch_id)

    def cancel(self, batch_id: str) -> Any:
        return self._call("cancel", self._client.batches.cancel, batch_id)

    def lines(self, file_id: str) -> Iterator[Line]:
        """The lines of an output or error file."""
        content = self._call("download", self._client.files.content, file_id)
        for raw in content.content.splitlines():
            if raw.strip():
                yield parse_line(raw)


def parse_line(raw: bytes | str) -> Line:
    """``{"custom_id", "response": {"status_code", "body"}, "error": {"code", "message"}}``."""
    document = json.loads(raw)
    response = document.get("response") or {}
    error = document.get("error") or {}
    body = response.get("body")
    status = response.get("status_code")
    return Line(custom_id=str(document.get("custom_id")),
                status_code=int(status) if status is not None else None,
                body=None if body is None else json.dumps(body, ensure_ascii=False),
                error_code=error.get("code"), error_message=error.get("message"))
