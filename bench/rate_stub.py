"""A bare ASGI OpenAI-compatible endpoint with a fixed latency, for bench_rate.py.

Run in its own processes (``uvicorn rate_stub:app --app-dir bench --workers N``)
so the server never competes with the client for one interpreter. Plain ASGI,
no framework: the stub must not be the bottleneck. The latency comes from
``RATE_STUB_DELAY_S`` (default 0.1 s); the answer is a valid AlpaGasus rating.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

DELAY_S = float(os.environ.get("RATE_STUB_DELAY_S", "0.1"))
MODELS = json.dumps({"object": "list", "data": [{"id": "stub", "object": "model"}]}).encode()


def _completion(body: dict) -> bytes:
    text = "4.5\nThe response follows the instruction accurately."
    chat = "messages" in body
    choice = {"index": 0, "finish_reason": "stop", "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return json.dumps({
        "id": "bench", "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()), "model": body.get("model", "stub"), "choices": [choice],
        "usage": {"prompt_tokens": 150, "completion_tokens": 12, "total_tokens": 162},
    }).encode()


async def app(scope, receive, send):  # noqa: ANN001 (ASGI)
    if scope["type"] != "http":
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    if scope["path"].endswith("/models"):
        payload = MODELS
    else:
        await asyncio.sleep(DELAY_S)
        payload = _completion(json.loads(b"".join(chunks) or b"{}"))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
