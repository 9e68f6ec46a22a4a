"""The console's HTTP side, inside the root app's replica: everything under ``/console/``.

Access follows the API's rules (``kiln.serve.http.check_api_key``). With an API key set, every
path but the key form (and its style sheet) needs the key, sent as the API takes it
(``X-API-Key`` or ``Authorization: Bearer``) or as the cookie the form sets (HttpOnly,
SameSite=Strict, path ``/console``). A request without it is refused with the API's status and
message (as an HTML page with the key form when a browser asks for a page). The rollout buttons
work only for a request that carries the key: with no key set, the console is read-only. Every
answer forbids loading anything from elsewhere (Content-Security-Policy ``'self'``).
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import time
import urllib.parse
from pathlib import Path
from typing import Any

from kiln.console.state import ConsoleData
from kiln.errors import KilnError, first_line
from kiln.serve.http import (
    API_KEY_HEADER,
    check_api_key,
    error_response,
    json_response,
    method_not_allowed,
    read_body,
)
from kiln.serve.protocol import ProtocolError
from kiln.serve.root_server import CONSOLE_PATH

logger = logging.getLogger("kiln.console")
STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "kiln_console_key"
ACTIONS = ("promote", "rollback", "pause", "resume")
PUBLIC = ("/static/console.css",)  # the key form's style: public, like the form itself
MAX_FORM_BYTES = 4096  # the key form and an action's JSON are tiny
STATE_CACHE_S = 0.5  # several open pages share one gathering
FRESH_S = 10.0  # a page gets a gathering up to this old at once (a newer one follows in the back)
# Ray's metrics exporter takes about half a second to answer and updates every few seconds: the
# console scrapes it in the background every METRICS_EVERY_S while a page polled within
# WATCHED_S, never while a page waits for its JSON.
METRICS_EVERY_S = 2.0
WATCHED_S = 30.0
PRIME_WAIT_S = 600.0  # how long the replica waits for `kiln serve start` to record what it serves
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
    "": "text/plain; charset=utf-8",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def static_files() -> dict[str, Path]:
    """The files the console serves: ``static/`` relative path -> file (a fixed list, so no request
    path ever reaches the file system)."""
    return {
        p.relative_to(STATIC).as_posix(): p
        for p in sorted(STATIC.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def login_page(message: str) -> str:
    """The page a browser gets when the key is missing or wrong: the API's message and a form."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Kiln console: API key needed</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{CONSOLE_PATH}/static/console.css"></head>
<body><main class="login"><h1>Kiln console</h1>
<p class="refused" role="alert" data-testid="refused">{html.escape(message)}</p>
<form method="post" action="{CONSOLE_PATH}/login">
<label for="key">API key of this server</label>
<input id="key" name="key" type="password" autocomplete="current-password" required>
<button type="submit">Open the console</button></form></main></body></html>"""


class ConsoleServer:
    """The async handler of ``/console/...`` (``kiln.serve.root_server.ConsoleFactory``)."""

    def __init__(self, run_dir: str, api_key_sha256: str | None):
        self.run_dir = run_dir
        self.api_key_sha256 = api_key_sha256
        self.data = ConsoleData(run_dir)
        self.files = static_files()
        self._cached: tuple[float, dict[str, Any]] | None = None  # (when, the page's JSON)
        self._gathering: asyncio.Task[None] | None = None
        self._generation = 0  # a gathering started before an action must not answer after it
        self._last_poll = 0.0
        self._background: set[asyncio.Task[None]] = set()
        self._scraping: asyncio.Task[None] | None = None
        try:  # built on the replica's event loop: pay the first gathering's costs before a visit
            asyncio.get_running_loop()
            self._spawn(self._prime())
        except RuntimeError:  # no running event loop (built in-process, in the unit tests)
            pass

    def _spawn(self, coro) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)  # a strong reference until it ends
        task.add_done_callback(self._background.discard)
        return task

    async def _prime(self) -> None:
        """At start, before anyone visits: import the heavy parts (MLflow's client, the rollout
        API, the Prometheus parser), wait for `kiln serve start` to record what it serves, then
        gather once (the first Serve status, deployment handles, registry facts and a metrics
        snapshot: seconds on a busy machine), so the first visitor's page has its data at once."""
        from kiln.serve.instance import load_state
        from kiln.waiting import WaitTimeout, wait_until

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _warm_up)
        try:
            await asyncio.to_thread(
                wait_until, lambda: load_state(self.run_dir), PRIME_WAIT_S, "the serve state"
            )
            await asyncio.to_thread(self.data.refresh_metrics)
            await self._gathering_task()
        except (KilnError, WaitTimeout) as exc:  # the first visit gathers instead
            logger.info("console: nothing gathered ahead of the first visit: %s", first_line(exc))

    def _watched(self) -> None:
        """A page polled: keep the metrics scraped in the background while pages poll."""
        self._last_poll = time.monotonic()
        if self._scraping is None or self._scraping.done():
            self._scraping = self._spawn(self._scrape_while_watched())

    async def _scrape_while_watched(self) -> None:
        while time.monotonic() - self._last_poll < WATCHED_S:
            await asyncio.to_thread(self.data.refresh_metrics)
            await asyncio.sleep(METRICS_EVERY_S)

    async def __call__(self, request):
        path = request.url.path[len(CONSOLE_PATH) :]
        if path == "":  # relative links need the trailing slash
            return _response(b"", 308, {"Location": f"{CONSOLE_PATH}/"})
        if path == "/login":
            return await self.login(request)
        if path in PUBLIC and request.method == "GET":
            return _response(self.files[path[len("/static/") :]].read_bytes(), 200, content=".css")
        try:
            key = self.authenticated(request)
        except ProtocolError as exc:
            if "text/html" in request.headers.get("accept", ""):
                return _response(login_page(str(exc)).encode(), exc.status, content=".html")
            return error_response(str(exc), exc.status, SECURITY_HEADERS)
        if path == "/api/action":
            if request.method != "POST":
                return method_not_allowed(request.method, request.url.path, "POST")
            return await self.action(request, key)
        if request.method != "GET":
            return method_not_allowed(request.method, request.url.path, "GET")
        if path == "/api/state":
            return await self.state(actions=key)
        if path == "/api/card":
            return await self.card(request)
        if path == "/" and (self._cached is None or time.monotonic() - self._cached[0] > FRESH_S):
            self._gathering_task()  # under way while the browser loads the page's scripts
        name = "index.html" if path == "/" else path[len("/static/") :]
        file = self.files.get(name) if path == "/" or path.startswith("/static/") else None
        if file is None:
            return error_response(f"no console page {request.url.path}", 404, SECURITY_HEADERS)
        return _response(file.read_bytes(), 200, content=file.suffix)

    def authenticated(self, request) -> bool:
        """Whether the request carries the API key (False when none is set). Raises ProtocolError
        401/403 when a key is set and the request lacks it or has a wrong one."""
        if self.api_key_sha256 is None:
            return False
        headers = {
            k: v for k, v in request.headers.items() if k in (API_KEY_HEADER, "authorization")
        }
        cookie = request.cookies.get(COOKIE)
        if cookie and not headers:
            headers[API_KEY_HEADER] = cookie
        check_api_key(headers, self.api_key_sha256)
        return True

    async def login(self, request):
        """GET: the key form. POST (form field ``key``): set the cookie and go to the console, or
        the form again with the API's refusal."""
        if request.method == "GET":
            return _response(login_page("").encode(), 200, content=".html")
        if request.method != "POST":
            return method_not_allowed(request.method, request.url.path, "GET, POST")
        try:
            body = await read_body(request, MAX_FORM_BYTES)
            key = urllib.parse.parse_qs(body.decode(errors="replace")).get("key", [""])[0]
            if self.api_key_sha256 is None:
                raise ProtocolError("this server has no API key: the console needs none", 400)
            check_api_key({API_KEY_HEADER: key}, self.api_key_sha256)
        except ProtocolError as exc:
            return _response(login_page(str(exc)).encode(), exc.status, content=".html")
        cookie = (
            f"{COOKIE}={urllib.parse.quote(key, safe='')}; Path={CONSOLE_PATH}; HttpOnly; "
            "SameSite=Strict"
        )
        return _response(b"", 303, {"Location": f"{CONSOLE_PATH}/", "Set-Cookie": cookie})

    async def state(self, actions: bool):
        """The page's JSON, answered from the last gathering (one for all open pages) while it is
        under FRESH_S old, a new one then started in the background once it is over
        STATE_CACHE_S old; an older one (or none) is waited for. The payload says when it was
        gathered; the metrics series come from the background scrapes."""
        self._watched()
        cached = self._cached
        age = time.monotonic() - cached[0] if cached is not None else None
        if cached is None or age is None or age > FRESH_S:
            for _ in range(3):  # again when an action came in meanwhile (its outcome next)
                try:
                    await asyncio.shield(self._gathering_task())
                except KilnError as exc:
                    return error_response(first_line(exc), 503, SECURITY_HEADERS)
                if (cached := self._cached) is not None:
                    break
        elif age > STATE_CACHE_S:
            self._gathering_task()
        if cached is None:
            return error_response("the console's state is being gathered again", 503)
        return json_response({**cached[1], "actions": actions}, headers=SECURITY_HEADERS)

    def _gathering_task(self) -> asyncio.Task[None]:
        """The gathering in flight, or a new one (never two at once)."""
        if self._gathering is None or self._gathering.done():
            self._gathering = self._spawn(self._gather())
            # a failure nobody awaited is shown by the next request that waits, not logged here
            self._gathering.add_done_callback(lambda t: t.cancelled() or t.exception())
        return self._gathering

    async def _gather(self) -> None:
        generation = self._generation
        payload = await self.data.gather(False)
        if generation == self._generation:
            self._cached = (time.monotonic(), payload)

    async def action(self, request, key: bool):
        """POST ``{"model": M, "action": promote|rollback|pause|resume}``: the rollout command, as
        ``kiln rollout ACTION M`` runs it (trigger ``console`` in the audit log)."""
        if not key:
            return error_response(
                "rollout actions from the console need the server's API key (serve.api_key_env)",
                403,
                SECURITY_HEADERS,
            )
        origin = request.headers.get("origin")
        if origin is not None and urllib.parse.urlsplit(origin).netloc != request.headers.get(
            "host"
        ):
            return error_response(f"cross-origin action from {origin}", 403, SECURITY_HEADERS)
        try:
            body = json.loads(await read_body(request, MAX_FORM_BYTES) or b"{}")
            model, action = str(body.get("model", "")), str(body.get("action", ""))
        except ProtocolError as exc:
            return error_response(str(exc), exc.status, SECURITY_HEADERS)
        except (ValueError, AttributeError):
            return error_response('the body must be {"model": M, "action": A}', 400)
        if action not in ACTIONS:
            return error_response(
                f"unknown action '{action}' (one of {', '.join(ACTIONS)})", 400, SECURITY_HEADERS
            )
        from kiln.rollout.control.api import rollout_command

        try:
            record = await asyncio.to_thread(
                rollout_command, self.run_dir, None, model, action, "console"
            )
        except KilnError as exc:
            return error_response(first_line(exc), 409, SECURITY_HEADERS)
        # the next page JSON shows the action's outcome: gathered anew, after it
        self._cached, self._gathering = None, None
        self._generation += 1
        return json_response(record.to_dict(), headers=SECURITY_HEADERS)

    async def card(self, request):
        """The model card of ``?model=NAME&version=V`` (a served model's registry version) as
        Markdown text."""
        from kiln.models.card import model_card
        from kiln.serve.instance import load_state

        model = request.query_params.get("model", "")
        version = request.query_params.get("version", "")
        state = load_state(self.run_dir)
        uris = {
            (m["name"], m["version"]): m.get("uri", "") for m in (state.models if state else [])
        }
        uri = uris.get((model, version)) or ""
        if not uri and state is not None:
            # a version a rollout loaded: the same registered model as a served one
            base = next((u for (n, _), u in uris.items() if n == model and u), "")
            uri = f"{base.rsplit('/', 1)[0]}/{version}" if base and version.isdigit() else ""
        if state is None or not uri or not state.tracking_uri:
            return error_response(f"model '{model}' v{version} is not served", 404)
        try:
            text = await asyncio.to_thread(model_card, state.tracking_uri, uri)
        except KilnError as exc:
            return error_response(first_line(exc), 404, SECURITY_HEADERS)
        return _response(text.encode(), 200, content="")


def _warm_up() -> None:
    """Import what the page's JSON needs (MLflow's client, the rollout API, the Prometheus
    parser): seconds on a busy machine, paid at start rather than by the first visitor."""
    import prometheus_client.parser  # noqa: F401
    from mlflow.tracking import MlflowClient  # noqa: F401

    import kiln.models.card  # noqa: F401
    import kiln.rollout.control.api  # noqa: F401


def _response(body: bytes, status: int, headers: dict[str, str] | None = None, content=".html"):
    from starlette.responses import Response

    return Response(
        body,
        status_code=status,
        headers={**SECURITY_HEADERS, **(headers or {})},
        media_type=CONTENT_TYPES.get(content, CONTENT_TYPES[""]),
    )


def console_factory(run_dir: str, api_key_sha256: str | None) -> ConsoleServer:
    """``ServingHooks.console``: the console's handler, built in the root app's replica."""
    return ConsoleServer(run_dir, api_key_sha256)
