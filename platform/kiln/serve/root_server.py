"""The root deployment (route prefix ``/``): server health and metadata, and clear 404s.

Requests for a served model go to that model's own application (its route prefix is longer), so a
request that reaches this deployment under ``/v2/models/`` names a model that is not served.
Imports neither torch nor the models: this replica stays small. When serving is started with a
console (``ServingHooks.console``, composed by the commands layer), requests under ``/console/``
are handed to it: the console lives above serving and is known here only as a factory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from kiln.serve import oip_pb2
from kiln.serve.grpc_protocol import grpc_reply, metadata_headers
from kiln.serve.http import error_response, json_response, method_not_allowed

READY_CACHE_S = 1.0
# How long the last answer stands while Serve's controller cannot be asked (it restarts in seconds
# after its process dies; the replicas answer requests without it meanwhile)
CONTROLLER_GONE_S = 30.0
# Serve's controller not answering a status question in this long counts as unreachable (the
# question waits in a thread: a hung controller must not hold this replica's health checks)
STATUS_TIMEOUT_S = 5.0
CONSOLE_PATH = "/console"

# (run_dir, api_key_sha256) -> an async request handler for everything under CONSOLE_PATH.
ConsoleFactory = Callable[[str, "str | None"], Callable[[Any], Awaitable[Any]]]


def unanswered(apps: Mapping[str, Any], app_names: list[str]) -> list[str]:
    """The applications of ``app_names`` that cannot answer a request: not deployed, being deleted,
    or with a deployment that has no RUNNING replica. An application whose replica died while
    another runs answers (HAProxy sends its requests to the running one), so it is not listed while
    Serve starts the replacement (its status is then UPDATING or UNHEALTHY for seconds)."""
    unready = []
    for name in app_names:
        app = apps.get(name)
        if (
            app is None
            or app.status in ("NOT_STARTED", "DELETING")
            or not app.deployments
            or any(_running(d.replica_states) < 1 for d in app.deployments.values())
        ):
            unready.append(name)
    return unready


class ControllerUnreachable(Exception):
    """Serve's controller did not answer (its process died, or it is restarting)."""


def _serve_applications() -> Mapping[str, Any]:
    from ray import serve
    from ray.exceptions import RayError

    try:
        return serve.status().applications
    except RayError as exc:
        raise ControllerUnreachable(type(exc).__name__) from exc


# Replica states that answer requests: RECOVERING is a running replica that Serve's controller,
# restarted after its process died, is attaching to again; PENDING_MIGRATION runs on a draining node
ANSWERING = {"RUNNING", "RECOVERING", "PENDING_MIGRATION"}


def _running(replica_states: Mapping[Any, int]) -> int:
    # Serve's keys are ReplicaState members (a str enum); compare their values
    return sum(
        n for state, n in replica_states.items() if getattr(state, "value", state) in ANSWERING
    )


class RootServer:
    """Serve deployment class for ``/v2/health/*``, ``/v2`` and ``/v2/models`` (a Kiln listing)."""

    def __init__(
        self,
        models: dict[str, dict[str, Any]],
        app_names: list[str],
        server_version: str,
        console: ConsoleFactory | None = None,
        run_dir: str = "",
        api_key_sha256: str | None = None,
        model_apps: dict[str, str] | None = None,
        status: Callable[[], Mapping[str, Any]] | None = None,
    ):
        self.models = models  # name -> {"versions": [...], "default_version": "..."}
        self.app_names = app_names
        self.model_apps = model_apps or {}  # served name -> its Serve application
        self._handles: dict[str, Any] = {}
        self.server_version = server_version
        self._ready: tuple[float, list[str]] | None = None
        self._asked = 0.0  # when Serve's controller was last asked (monotonic)
        self._status = status or _serve_applications
        self._asking: asyncio.Future[Mapping[str, Any]] | None = None  # the question in flight
        self.console = console(run_dir, api_key_sha256) if console is not None else None

    async def not_ready(self) -> list[str]:
        """Kiln applications with no replica answering (``unanswered``; cached briefly: health
        checks come often)."""
        now = time.monotonic()
        if self._ready is not None and now - self._asked <= READY_CACHE_S:
            return self._ready[1]
        self._asked = now
        try:
            self._ready = (now, unanswered(await self._ask_status(), self.app_names))
        except ControllerUnreachable as exc:
            # Serve's controller died or restarts: the replicas keep answering, so the last answer
            # stands for a while; then readiness says what it cannot see
            if self._ready is None or now - self._ready[0] > CONTROLLER_GONE_S:
                return [f"Serve's controller cannot be reached: {exc}"]
        return self._ready[1]

    async def _ask_status(self) -> Mapping[str, Any]:
        """Serve's status, asked in a thread, one question at a time: a question still unanswered
        after STATUS_TIMEOUT_S (or still unanswered from an earlier call) is ControllerUnreachable,
        and the next call waits on that same question instead of piling up threads."""
        if self._asking is None or self._asking.done():
            self._asking = asyncio.ensure_future(asyncio.to_thread(self._status))
        try:
            return await asyncio.wait_for(asyncio.shield(self._asking), STATUS_TIMEOUT_S)
        except TimeoutError as exc:
            raise ControllerUnreachable(f"no answer in {STATUS_TIMEOUT_S:g} s") from exc

    async def __call__(self, request):
        path = request.url.path.rstrip("/") or "/"
        parts = [p for p in path.split("/") if p]
        if self.console is not None and parts[:1] == [CONSOLE_PATH.strip("/")]:
            return await self.console(request)
        if parts[:2] == ["v2", "models"] and len(parts) >= 3:
            served = ", ".join(sorted(self.models)) or "none"
            return error_response(f"unknown model '{parts[2]}' (served: {served})", 404)
        routes = {
            "/v2/health/live": self.live,
            "/v2/health/ready": self.ready,
            "/v2": self.server_metadata,
            "/v2/models": self.list_models,
        }
        handler = routes.get(path)
        if handler is None:
            return error_response(
                f"no endpoint {path} (the Open Inference Protocol lives under /v2)", 404
            )
        if request.method != "GET":
            return method_not_allowed(request.method, path, "GET")
        answer = handler()
        return await answer if asyncio.iscoroutine(answer) else answer

    def live(self):
        return json_response({"live": True})

    async def ready(self):
        pending = await self.not_ready()
        if pending:
            return json_response({"ready": False, "not_running": pending}, 503)
        return json_response({"ready": True})

    def server_metadata(self):
        return json_response(
            {"name": "kiln", "version": self.server_version, "extensions": ["binary_tensor_data"]}
        )

    def list_models(self):
        return json_response(
            {"models": [{"name": name, **info} for name, info in sorted(self.models.items())]}
        )

    # --- the Open Inference Protocol over gRPC: the server-wide RPCs, and the model RPCs that
    # reach this app instead of the model's own (see kiln.compat.route_grpc_by_model) ----------

    async def ServerLive(self, request, grpc_context=None):  # noqa: N802 (the RPC's name)
        """gRPC ServerLive."""
        return oip_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, grpc_context=None):  # noqa: N802
        """gRPC ServerReady: every Kiln application runs."""
        return oip_pb2.ServerReadyResponse(ready=not await self.not_ready())

    async def ServerMetadata(self, request, grpc_context=None):  # noqa: N802
        """gRPC ServerMetadata (the REST ``GET /v2``'s name and version)."""
        return oip_pb2.ServerMetadataResponse(name="kiln", version=self.server_version)

    async def ModelInfer(self, request, grpc_context=None):  # noqa: N802
        """gRPC ModelInfer, forwarded to the model's application (NOT_FOUND for one not
        served)."""
        return await self._forward("ModelInfer", request.model_name, request, grpc_context)

    async def ModelMetadata(self, request, grpc_context=None):  # noqa: N802
        """gRPC ModelMetadata, forwarded to the model's application."""
        return await self._forward("ModelMetadata", request.name, request, grpc_context)

    async def ModelReady(self, request, grpc_context=None):  # noqa: N802
        """gRPC ModelReady, forwarded to the model's application."""
        return await self._forward("ModelReady", request.name, request, grpc_context)

    async def _forward(self, method: str, name: str, request, grpc_context):
        response_type = getattr(oip_pb2, f"{method}Response")
        app = self.model_apps.get(name)
        if app is None:
            served = ", ".join(sorted(self.models)) or "none"
            return grpc_reply(
                grpc_context, response_type(), 404, f"unknown model '{name}' (served: {served})"
            )
        handle = self._handles.get(app)
        if handle is None:
            from ray import serve

            handle = self._handles[app] = serve.get_app_handle(app)
        payload, status, message = await handle.grpc_forwarded.remote(
            method, request.SerializeToString(), metadata_headers(grpc_context)
        )
        return grpc_reply(grpc_context, response_type.FromString(payload), status, message)
