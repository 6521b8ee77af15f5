"""``gleaner view``: a local web page over a run's store, read in place.

A Starlette app: JSON endpoints over :class:`~gleaner.flows.viewer.pool.RunPool` and one
static page (``static/``) whose script builds the DOM with ``textContent`` only: example
text is untrusted and is never parsed as HTML. The page's Content-Security-Policy allows
no inline script either.

Bound to loopback, requests whose ``Host`` is not a loopback name are refused (DNS
rebinding). Bound to anything else, every API request must carry the token ``gleaner view``
printed (``X-Gleaner-Token`` header or ``?token=``); the page asks for it. A review (exclude,
flag) is a POST with a JSON body and the ``X-Gleaner`` header, which no cross-site form can
send.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gleaner.flows.viewer import evaluation
from gleaner.flows.viewer.pool import RunPool
from gleaner.store import Store
from gleaner.tasks.select.review import ACTIONS, record_review, review_log

log = logging.getLogger("gleaner.view")
STATIC = Path(__file__).parent / "static"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
TOKEN_HEADER = "x-gleaner-token"


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


class Guard:
    """Security headers on every answer; the token (when set) on every API request; on
    loopback, only loopback Host names."""

    def __init__(self, app: ASGIApp, token: str | None, loopback: bool):
        self.app, self.token, self.loopback = app, token, loopback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self.refuse(request)
        if refusal is not None:
            await refusal(scope, receive, send)
            return

        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                headers += [(b"content-security-policy", CSP.encode()),
                            (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer"),
                            (b"x-frame-options", b"DENY"),
                            (b"cache-control", b"no-store")]
            await send(message)

        await self.app(scope, receive, with_headers)

    def refuse(self, request: Request) -> Response | None:
        if self.loopback:
            host = (request.headers.get("host") or "").rsplit(":", 1)[0]
            if host not in LOOPBACK_NAMES:
                return JSONResponse({"error": "this viewer answers loopback names only"}, 403)
        if self.token and request.url.path.startswith("/api/"):
            given = request.headers.get(TOKEN_HEADER) or request.query_params.get("token") or ""
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return JSONResponse({"error": "token required", "token_required": True}, 401)
        if request.method not in ("GET", "HEAD") and request.headers.get("x-gleaner") != "1":
            return JSONResponse({"error": "a review needs the X-Gleaner header"}, 403)
        return None


def _number(text: str) -> float | None:
    return float(text) if text.strip() != "" else None


def parse_query(params: Any) -> dict[str, Any]:
    """``range=field,lo,hi`` (either end empty), ``is=field,value`` (repeated), ``q``,
    ``sort``, ``desc``, ``offset``, ``limit``."""
    ranges = []
    for value in params.getlist("range"):
        name, _, rest = value.partition(",")
        low, _, high = rest.partition(",")
        ranges.append((name, _number(low), _number(high)))
    equals = []
    for value in params.getlist("is"):
        name, _, wanted = value.partition(",")
        equals.append((name, wanted))
    return {"ranges": ranges, "equals": equals, "search": params.get("q") or None,
            "sort": params.get("sort") or None, "descending": params.get("desc") in ("1", "true"),
            "offset": int(params.get("offset") or 0), "limit": int(params.get("limit") or 50)}


def create_app(store: Store, run_id: str, *, token: str | None = None, loopback: bool = True,
               reviewer: str | None = None, prefect_api: str | None = None,
               prefect_ui: str | None = None) -> Starlette:
    pool = RunPool(store, run_id)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def script(request: Request) -> Response:
        return FileResponse(STATIC / "app.js", media_type="text/javascript")

    async def style(request: Request) -> Response:
        return FileResponse(STATIC / "style.css", media_type="text/css")

    def run_info(request: Request) -> Response:
        pool.refresh()
        return JSONResponse({**pool.describe(), "store": store.uri(store.root),
                             "reviewer": reviewer or "", "prefect_ui": prefect_ui})

    def pool_page(request: Request) -> Response:
        try:
            return JSONResponse(pool.query(**parse_query(request.query_params)))
        except (KeyError, ValueError) as error:
            return JSONResponse({"error": str(error).strip("'\"")}, 400)

    def example(request: Request) -> Response:
        found = pool.example(request.path_params["example_id"])
        if found is None:
            return JSONResponse({"error": "no such example in this run"}, 404)
        return JSONResponse(found)

    def counts(request: Request) -> Response:
        pool.refresh()
        return JSONResponse({"summaries": pool.summaries(), "histograms": pool.histograms(),
                             **pool.describe()})

    async def review(request: Request) -> Response:
        body = await request.json()
        action, ids = body.get("action"), body.get("ids") or []
        if action not in ACTIONS or not isinstance(ids, list) or not ids:
            return JSONResponse({"error": f"action one of {', '.join(ACTIONS)} and ids"}, 400)
        if not pool.known([str(i) for i in ids]):
            return JSONResponse({"error": "some ids are not examples of this run"}, 400)
        written = record_review(store, run_id, ids, action, str(body.get("why") or ""),
                                str(body.get("who") or reviewer or ""))
        log.info("review: %s %d example(s) by %s", action, len(ids), written["who"])
        pool.refresh(force=True)
        return JSONResponse(written)

    def review_history(request: Request) -> Response:
        table = review_log(store, run_id)
        rows = table.drop_columns(["status"]).to_pylist()[::-1][:500]
        return JSONResponse({"total": table.num_rows,
                             "rows": [{**r, "at": r["at"].isoformat()} for r in rows]})

    def evaluations(request: Request) -> Response:
        return JSONResponse({"comparisons": evaluation.comparisons(store, run_id),
                             "arms": evaluation.arms(store, run_id)})

    def pairs(request: Request) -> Response:
        params = request.query_params
        try:
            return JSONResponse(evaluation.pairs(
                store, run_id, request.path_params["comparison"],
                request.path_params["test_set"], offset=int(params.get("offset") or 0),
                limit=int(params.get("limit") or 20), outcome=params.get("verdict") or None))
        except FileNotFoundError as error:
            return JSONResponse({"error": str(error)}, 404)

    async def flow_runs(request: Request) -> Response:
        return JSONResponse(await prefect_flow_runs(prefect_api, prefect_ui, run_id))

    routes = [
        Route("/", page), Route("/app.js", script), Route("/style.css", style),
        Route("/api/run", run_info), Route("/api/pool", pool_page),
        Route("/api/example/{example_id}", example), Route("/api/counts", counts),
        Route("/api/review", review, methods=["POST"]),
        Route("/api/review", review_history, methods=["GET"]),
        Route("/api/evaluation", evaluations),
        Route("/api/evaluation/{comparison}/{test_set}", pairs),
        Route("/api/flow-runs", flow_runs),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Guard, token=token,
                                                          loopback=loopback)])
    app.state.pool = pool
    return app


async def prefect_flow_runs(api: str | None, ui: str | None, run_id: str) -> dict[str, Any]:
    """The Prefect flow runs whose name holds the run id (``curate-<id>``, ``rate-<id>``...),
    each with its page in the Prefect UI; an error line when the API cannot be reached."""
    if not api:
        return {"api": None, "runs": [], "error": "no Prefect API configured (PREFECT_API_URL)"}
    import httpx

    ui = (ui or api.removesuffix("/api")).rstrip("/")
    body = {"flow_runs": {"name": {"like_": run_id}}, "sort": "START_TIME_DESC", "limit": 200}
    try:
        async with httpx.AsyncClient(timeout=5.0) as client:
            answer = await client.post(f"{api.rstrip('/')}/flow_runs/filter", json=body)
            answer.raise_for_status()
    except httpx.HTTPError as error:
        return {"api": api, "runs": [], "error": f"Prefect API {api}: {error}"}
    runs = [{"name": r.get("name"), "state": (r.get("state") or {}).get("name")
             or r.get("state_name"), "start_time": r.get("start_time"),
             "url": f"{ui}/runs/flow-run/{r['id']}"} for r in answer.json()]
    return {"api": api, "runs": runs}


def serve(store: Store, run_id: str, host: str = "127.0.0.1", port: int = 8765,
          reviewer: str | None = None, prefect_api: str | None = None,
          prefect_ui: str | None = None, token: str | None = None,
          announce: Any = print) -> None:
    """Run the viewer until interrupted; prints its URL (and the token off loopback)."""
    import uvicorn

    loopback = is_loopback(host)
    token = token or (None if loopback else os.environ.get("GLEANER_VIEW_TOKEN") or new_token())
    app = create_app(store, run_id, token=token, loopback=loopback, reviewer=reviewer,
                     prefect_api=prefect_api, prefect_ui=prefect_ui)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else shown}:{port}/"
    announce(f"gleaner view: run {run_id} ({app.state.pool.index.num_rows:,} examples) at {url}")
    if token:
        announce(f"token: {token}")
        announce(f"open {url}?token={token}")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
