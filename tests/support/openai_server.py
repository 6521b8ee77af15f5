"""A real OpenAI-compatible HTTP server on loopback, for tests and benchmarks.

Starlette + uvicorn in a background thread. A ``responder`` decides every
answer, so a test can inject 429 with Retry-After, 500, hangs, unparseable
text, broken JSON bodies and top_logprobs; every request body is recorded.
Serves ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@dataclass
class Reply:
    content: str = ""
    # One dict per generated position: {token: logprob}, most likely first.
    top_logprobs: list[dict[str, float]] | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    raw_body: str | None = None  # sent verbatim with status 200 (e.g. broken JSON)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error_message: str | None = None  # a non-200 answer's message (default "injected <status>")
    finish_reason: str = "stop"  # "length": the answer was cut at max_tokens


Responder = Callable[[dict[str, Any]], "Reply | str"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request_text(body: dict[str, Any]) -> str:
    """The prompt text of a chat or completions request, for responders to inspect."""
    if "messages" in body:
        return "\n".join(str(m.get("content", "")) for m in body["messages"])
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else "\n".join(map(str, prompt))


class OpenAIStub:
    def __init__(self, responder: Responder, model: str = "stub-model", port: int | None = None):
        self.responder = responder
        self.model = model
        self.port = port or free_port()
        self.requests: list[dict[str, Any]] = []
        self.request_headers: list[dict[str, str]] = []  # one per request, same order
        self.client_ports: list[int] = []  # one per request: one port, one connection
        self.inflight = self.peak_inflight = 0  # requests being answered at once (one loop)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def count(self, predicate: Callable[[dict[str, Any]], bool] | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if predicate is None or predicate(r))

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.request_headers.clear()
            self.client_ports.clear()

    # ---- HTTP -------------------------------------------------------------
    async def _completion(self, request: Request) -> Response:
        self.inflight += 1
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        try:
            return await self._answer(request)
        finally:
            self.inflight -= 1

    async def _answer(self, request: Request) -> Response:
        body = await request.json()
        with self._lock:
            self.requests.append(body)
            self.request_headers.append(dict(request.headers))
            self.client_ports.append(request.client.port if request.client else 0)
        reply = self.responder(body)
        if isinstance(reply, str):
            reply = Reply(content=reply)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.status != 200:
            return JSONResponse(
                {"error": {"message": reply.error_message or f"injected {reply.status}",
                           "type": "stub"}},
                status_code=reply.status,
                headers=reply.headers,
            )
        if reply.raw_body is not None:
            return Response(reply.raw_body, media_type="application/json", headers=reply.headers)
        chat = request.url.path.endswith("/chat/completions")
        return JSONResponse(self._body(body, reply, chat), headers=reply.headers)

    def _body(self, body: dict[str, Any], reply: Reply, chat: bool) -> dict[str, Any]:
        prompt_tokens = reply.prompt_tokens or max(1, len(request_text(body)) // 4)
        completion_tokens = reply.completion_tokens or max(1, len(reply.content) // 4)
        choice: dict[str, Any] = {"index": 0, "finish_reason": reply.finish_reason}
        want_logprobs = bool(body.get("logprobs"))
        if chat:
            choice["message"] = {"role": "assistant", "content": reply.content}
            choice["logprobs"] = None
            if want_logprobs and reply.top_logprobs is not None:
                choice["logprobs"] = {
                    "content": [
                        {
                            "token": next(iter(top)),
                            "logprob": next(iter(top.values())),
                            "bytes": None,
                            "top_logprobs": [
                                {"token": t, "logprob": lp, "bytes": None} for t, lp in top.items()
                            ],
                        }
                        for top in reply.top_logprobs
                    ]
                }
        else:
            choice["text"] = reply.content
            choice["logprobs"] = None
            if want_logprobs and reply.top_logprobs is not None:
                choice["logprobs"] = {
                    "tokens": [next(iter(top)) for top in reply.top_logprobs],
                    "token_logprobs": [next(iter(top.values())) for top in reply.top_logprobs],
                    "top_logprobs": reply.top_logprobs,
                    "text_offset": [0 for _ in reply.top_logprobs],
                }
        return {
            "id": f"stub-{next(self._ids)}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def _models(self, request: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "stub"}]}
        )

    # ---- lifecycle --------------------------------------------------------
    def routes(self) -> list[Route]:
        """What the server serves (a subclass adds its own: tests/support/batch_server.py)."""
        return [
            Route("/v1/chat/completions", self._completion, methods=["POST"]),
            Route("/v1/completions", self._completion, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
        ]

    def start(self) -> OpenAIStub:
        app = Starlette(routes=self.routes())
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="openai-stub")
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"OpenAI stub did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> OpenAIStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def json_reply(document: Any) -> Reply:
    return Reply(content=json.dumps(document))
