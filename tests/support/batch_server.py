"""A loopback OpenAI Batch API: ``/v1/files`` and ``/v1/batches`` beside the chat endpoints.

:class:`BatchServer` is :class:`~tests.support.openai_server.OpenAIStub` (the same
``responder`` answers every request, so a batch answers exactly what the
synchronous endpoint would) plus, in OpenAI's JSON shapes (openai.types.Batch,
FileObject, the output/error line format):

- ``POST /v1/files`` (multipart upload, purpose ``batch``), ``GET /v1/files/{id}``,
  ``GET /v1/files/{id}/content``;
- ``POST /v1/batches`` (validates the file: JSONL, one url, unique custom ids),
  ``GET /v1/batches/{id}``, ``GET /v1/batches`` (list), ``POST /v1/batches/{id}/cancel``.

A batch is ``validating``, then ``in_progress``, and completes ``complete_after_s``
after it was created. Faults a test can ask for, by the batch's ordinal (0 = the
first batch created): ``expire`` (half the requests done, the rest in the error
file with ``batch_expired`` or, with ``expired_rest = "missing"``, nowhere),
``error_ids`` (custom ids answered in the error file with ``server_error``), and
``shuffle`` (output lines out of order). Every custom id ever submitted is counted
in ``submitted``.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.openai_server import OpenAIStub, Reply, Responder

TERMINAL = ("completed", "failed", "expired", "cancelled")


class BatchServer(OpenAIStub):
    def __init__(self, responder: Responder, *, complete_after_s: float = 0.3,
                 model: str = "stub-model", port: int | None = None):
        super().__init__(responder, model, port)
        self.complete_after_s = complete_after_s
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.due: dict[str, float] = {}
        self.submitted: Counter[str] = Counter()  # custom id -> times sent in a batch
        self.batch_bodies: list[dict[str, Any]] = []  # every request body a batch ran
        self.calls: Counter[str] = Counter()  # "files.create", "batches.retrieve", ...
        self.expire: set[int] = set()
        self.expired_rest = "error_file"  # or "missing"
        self.error_ids: Callable[[str], bool] = lambda custom_id: False
        self.shuffle = False
        self._numbers = itertools.count()
        self._batch_lock = threading.Lock()

    def routes(self) -> list[Route]:
        return [*super().routes(),
                Route("/v1/files", self._upload, methods=["POST"]),
                Route("/v1/files/{file_id}/content", self._content, methods=["GET"]),
                Route("/v1/files/{file_id}", self._file, methods=["GET"]),
                Route("/v1/batches", self._create, methods=["POST"]),
                Route("/v1/batches", self._list, methods=["GET"]),
                Route("/v1/batches/{batch_id}/cancel", self._cancel, methods=["POST"]),
                Route("/v1/batches/{batch_id}", self._retrieve, methods=["GET"])]

    # ---- files ---------------------------------------------------------------------------------
    def _add_file(self, name: str, data: bytes, purpose: str) -> dict[str, Any]:
        file_id = f"file-{len(self.files):05d}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(data),
                               "created_at": int(time.time()), "filename": name,
                               "purpose": purpose, "status": "processed"}
        self.contents[file_id] = data
        return self.files[file_id]

    async def _upload(self, request: Request) -> Response:
        self.calls["files.create"] += 1
        form = await request.form()
        upload, purpose = form["file"], form.get("purpose")
        if purpose != "batch":
            return _error(400, f"purpose must be batch, not {purpose!r}")
        data = await upload.read()
        with self._batch_lock:
            return JSONResponse(self._add_file(upload.filename or "upload.jsonl", data, "batch"))

    async def _file(self, request: Request) -> Response:
        file = self.files.get(request.path_params["file_id"])
        return JSONResponse(file) if file else _error(404, "no such file")

    async def _content(self, request: Request) -> Response:
        self.calls["files.content"] += 1
        data = self.contents.get(request.path_params["file_id"])
        if data is None:
            return _error(404, "no such file")
        return Response(data, media_type="application/octet-stream")

    # ---- batches -------------------------------------------------------------------------------
    async def _create(self, request: Request) -> Response:
        self.calls["batches.create"] += 1
        body = await request.json()
        data = self.contents.get(body.get("input_file_id", ""))
        if data is None:
            return _error(400, "input_file_id names no uploaded file")
        try:
            lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        except ValueError:
            return _error(400, "the input file is not JSONL")
        ids = [line["custom_id"] for line in lines]
        if len(set(ids)) != len(ids):
            return _error(400, "custom_id values must be unique within a batch")
        if any(line.get("url") != body.get("endpoint") for line in lines):
            return _error(400, "every line's url must be the batch's endpoint")
        now = int(time.time())
        with self._batch_lock:
            number = next(self._numbers)
            batch_id = f"batch_{number:05d}"
            self.submitted.update(ids)
            self.batches[batch_id] = {
                "id": batch_id, "object": "batch", "endpoint": body["endpoint"],
                "input_file_id": body["input_file_id"],
                "completion_window": body.get("completion_window", "24h"),
                "status": "validating", "created_at": now, "expires_at": now + 86400,
                "output_file_id": None, "error_file_id": None, "errors": None,
                "in_progress_at": None, "finalizing_at": None, "completed_at": None,
                "failed_at": None, "expired_at": None, "cancelling_at": None,
                "cancelled_at": None, "metadata": body.get("metadata"),
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                "_number": number, "_lines": lines,
            }
            self.due[batch_id] = time.monotonic() + self.complete_after_s
        return JSONResponse(_public(self.batches[batch_id]))

    async def _retrieve(self, request: Request) -> Response:
        self.calls["batches.retrieve"] += 1
        batch_id = request.path_params["batch_id"]
        with self._batch_lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                return _error(404, "no such batch")
            self._advance(batch)
            return JSONResponse(_public(batch))

    async def _list(self, request: Request) -> Response:
        self.calls["batches.list"] += 1
        with self._batch_lock:
            data = [_public(b) for b in sorted(self.batches.values(), key=lambda b: -b["_number"])]
        return JSONResponse({"object": "list", "data": data, "has_more": False,
                             "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None})

    async def _cancel(self, request: Request) -> Response:
        self.calls["batches.cancel"] += 1
        with self._batch_lock:
            batch = self.batches.get(request.path_params["batch_id"])
            if batch is None:
                return _error(404, "no such batch")
            if batch["status"] not in TERMINAL:
                batch["status"], batch["cancelling_at"] = "cancelling", int(time.time())
                self._finish(batch, "cancelled", half=True)
            return JSONResponse(_public(batch))

    def _advance(self, batch: dict[str, Any]) -> None:
        if batch["status"] in TERMINAL:
            return
        if batch["status"] == "validating":
            batch["status"], batch["in_progress_at"] = "in_progress", int(time.time())
            return
        if time.monotonic() < self.due[batch["id"]]:
            return
        if batch["_number"] in self.expire:
            self._finish(batch, "expired", half=True)
        else:
            self._finish(batch, "completed", half=False)

    def _finish(self, batch: dict[str, Any], status: str, half: bool) -> None:
        lines = batch["_lines"]
        done = lines[: len(lines) // 2] if half else lines
        output, errors = [], []
        for line in done:
            custom_id = line["custom_id"]
            if self.error_ids(custom_id):
                errors.append({"id": f"batch_req_{custom_id}", "custom_id": custom_id,
                               "response": None,
                               "error": {"code": "server_error", "message": "injected"}})
                continue
            self.batch_bodies.append(line["body"])
            reply = self.responder(line["body"])
            reply = Reply(content=reply) if isinstance(reply, str) else reply
            chat = line["url"].endswith("/chat/completions")
            if reply.status == 200:
                response = {"status_code": 200, "request_id": f"req_{custom_id}",
                            "body": self._body(line["body"], reply, chat)}
                output.append({"id": f"batch_req_{custom_id}", "custom_id": custom_id,
                               "response": response, "error": None})
            else:
                message = reply.error_message or f"injected {reply.status}"
                response = {"status_code": reply.status, "request_id": f"req_{custom_id}",
                            "body": {"error": {"message": message, "type": "stub"}}}
                errors.append({"id": f"batch_req_{custom_id}", "custom_id": custom_id,
                               "response": response, "error": None})
        if status != "completed" and self.expired_rest == "error_file":
            code = "batch_expired" if status == "expired" else "batch_cancelled"
            errors += [{"id": f"batch_req_{line['custom_id']}", "custom_id": line["custom_id"],
                        "response": None, "error": {"code": code, "message": f"{status}"}}
                       for line in lines[len(done):]]
        if self.shuffle:
            random.Random(batch["_number"]).shuffle(output)
        now = int(time.time())
        if output:
            batch["output_file_id"] = self._add_file(
                f"{batch['id']}_output.jsonl", _jsonl(output), "batch_output")["id"]
        if errors:
            batch["error_file_id"] = self._add_file(
                f"{batch['id']}_errors.jsonl", _jsonl(errors), "batch_output")["id"]
        ok = sum(1 for o in output)
        batch["request_counts"] = {"total": len(lines), "completed": ok,
                                   "failed": len(done) - ok}
        batch["status"] = status
        batch[{"completed": "completed_at", "expired": "expired_at",
               "cancelled": "cancelled_at"}[status]] = now


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _public(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}},
                        status_code=status)
