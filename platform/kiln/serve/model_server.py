"""The ingress deployment of one served model: all its served versions live in each replica.

Keeping the versions in the ingress replica means the request that reaches the replica is answered
there: no second hop through a deployment handle (measured at 3-3.5 ms on this kind of machine).
``route`` picks the version of an unversioned request: the default version, or during a rollout
the routing table's choice (``kiln.rollout.core.replica.RolloutAgent``: a weighted choice in this
replica, no extra hop). New versions a rollout names are loaded into the running replica, so a
rollout needs no redeploy.

Paths, under ``/v2/models/{name}``: ``GET ""`` (metadata), ``GET /ready``, ``POST /infer``,
``POST /predict`` (convenience JSON), ``GET /monitor`` (live monitoring: drift, OOD, alerts; this
replica's window), and the same under ``/versions/{version}``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from kiln.models.isolated_runtime import RuntimeProcessDied
from kiln.models.probabilities import softmax
from kiln.serve import oip_pb2
from kiln.serve.config import BatchingConfig
from kiln.serve.grpc_protocol import grpc_reply, metadata_headers, metadata_response
from kiln.serve.grpc_protocol import infer_request as grpc_infer_request
from kiln.serve.grpc_protocol import infer_response as grpc_infer_response
from kiln.serve.http import (
    RETRY_AFTER_S,
    check_api_key,
    error_response,
    json_response,
    method_not_allowed,
    read_body,
)
from kiln.serve.limits import OFFLOAD_BYTES, LimitsConfig
from kiln.serve.plan import ModelAppSpec
from kiln.serve.protocol import (
    CLIENT_ERRORS,
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    Tensor,
    check_outputs,
    encode_infer_response,
    load_json,
    parse_infer_request,
    select_outputs,
)
from kiln.serve.versions import ServedVersion

logger = logging.getLogger("ray.serve")
T = TypeVar("T")
WINDOW_NEEDS_KEY = (
    "the monitor's window (?window=1: recent raw input rows and the training data's statistics) "
    "is served only with an API key (serve.api_key_env); on a server without one, `kiln monitor "
    "report` reads it through Ray"
)


async def off_loop(work: Callable[[], T], size: int) -> T:
    """``work()`` (parsing, decoding), in a worker thread for a body over ``OFFLOAD_BYTES`` so that
    the replica's event loop keeps answering health checks and other requests meanwhile."""
    if size <= OFFLOAD_BYTES:
        return work()
    return await asyncio.get_running_loop().run_in_executor(None, work)


def finite(logits: np.ndarray) -> np.ndarray:
    """The logits, or ProtocolError (422) when the model's output for this input is not finite:
    no answer carries NaN or Infinity (strict JSON)."""
    if not np.isfinite(logits).all():
        raise ProtocolError(
            "the model's output for this input is not finite (NaN or Infinity)", 422
        )
    return logits


class ServerFault(Exception):
    """A request that failed through no fault of the client's (answered 500 / INTERNAL)."""

    status = 500


class VersionLost(ServerFault):
    """The process of the version answering a request died (an isolated candidate's crash): the
    request may be retried, and the other versions answer (503 / UNAVAILABLE, ``Retry-After``)."""

    status = 503


def presigned(method: Callable[[list[np.ndarray]], Awaitable[list[np.ndarray]]]):
    """``method`` as a plain function of the same name that carries its signature: serve.batch
    reads the signature of the function it wraps on every request (``extract_signature``), which
    ``inspect`` rebuilds each time for a bound method (about 14 us) but takes as it is from
    ``__signature__`` (about 5 us). The name stays: it labels Serve's ``serve_batch_*`` metrics."""

    async def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        return await method(inputs)

    run.__name__ = run.__qualname__ = method.__name__
    run.__signature__ = inspect.signature(run)  # type: ignore[attr-defined]
    return run


class BatchGate:
    """Holds a version's requests back while a batch of theirs is on the model, then lets all that
    waited through in one event-loop turn: serve.batch then joins them into one batch.

    serve.batch (Ray 2.60, ``batching._BatchQueue``) does not batch what queues behind a running
    batch: its task takes whatever its queue holds the moment it runs (with
    ``batch_wait_timeout_s`` 0, the requests put there in the same loop turn), and every batch it
    forms waits behind the running one (``max_concurrent_batches`` 1). Requests that reach it one
    loop turn apart are batches of one each. gRPC calls do: grpc.aio's server accepts a method's
    next call only once its loop has run the previous one's acceptance (one outstanding
    request-call per method, re-armed in ``_server_main_loop``) and reads each message in another
    completion-queue round trip, so calls come in one loop turn apart; with Kiln's handler on the
    replica's own loop (``SEPARATE_USER_LOOP_ENV`` "0") ResNet over gRPC formed no batches.

    The gate opens when every request it let through has its answer, stays open ``wait_s`` (0: the
    rest of the loop turn it opened in) after the first request goes through, then closes until
    those requests are answered. ``wait_ms: 0`` thus batches what queued while the previous batch
    ran, whatever the protocol, and a version with nothing running adds no wait."""

    def __init__(self) -> None:
        self._through = 0  # requests let through whose answers are not back
        self._open = asyncio.Event()  # cleared while the gate is closed
        self._open.set()
        self._closing: asyncio.Handle | None = None

    async def through(self, call: Callable[[], Awaitable[T]], wait_s: float) -> T:
        """``await call()``, once the gate lets this request through."""
        while not self._open.is_set():  # (it may close again before this request resumes)
            await self._open.wait()
        if self._closing is None:  # the first through: the gate closes after the wait
            loop = asyncio.get_running_loop()
            self._closing = (
                loop.call_later(wait_s, self._close) if wait_s > 0 else loop.call_soon(self._close)
            )
        self._through += 1
        try:
            return await call()
        finally:
            self._through -= 1
            if self._through == 0:
                self._reopen()

    def _close(self) -> None:
        if self._through:
            self._open.clear()
        else:  # none left waiting for an answer: stay open, the next request closes it
            self._closing = None

    def _reopen(self) -> None:
        if self._closing is not None:
            self._closing.cancel()
            self._closing = None
        self._open.set()


class VersionRunner:
    """Runs one version's model: dynamic batching (serve.batch, behind a BatchGate) or one call per
    request, off the event loop."""

    def __init__(self, served: ServedVersion, metrics):
        self.served = served
        self.metrics = metrics
        # One thread per version: model calls of a version run one at a time, and the event loop
        # stays free to take the next requests (which then form the next batch).
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix=f"kiln-{served.model_name}-v{served.version}"
        )
        self._batched: Any = None  # the serve.batch wrapper of _run_batch, once batching is on
        self._gate = BatchGate()  # what queues while a batch runs goes to serve.batch at once
        self.batching = BatchingConfig(enabled=False)

    def configure(self, batching: BatchingConfig) -> None:
        from ray import serve

        self.batching = batching
        if not batching.enabled:
            return
        if self._batched is None:
            self._batched = serve.batch(
                max_batch_size=batching.max_batch_size,
                batch_wait_timeout_s=batching.wait_ms / 1000.0,
            )(presigned(self._run_batch))
        else:
            self._batched.set_max_batch_size(batching.max_batch_size)
            self._batched.set_batch_wait_timeout_s(batching.wait_ms / 1000.0)

    async def logits(self, x: np.ndarray) -> np.ndarray:
        if self.batching.enabled and self._batched is not None:
            batched = self._batched
            return await self._gate.through(lambda: batched(x), self.batching.wait_ms / 1000.0)
        out = await asyncio.get_running_loop().run_in_executor(self._executor, self._call, x)
        return out

    async def _run_batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(x) for x in inputs]
        joined = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
        out = await asyncio.get_running_loop().run_in_executor(self._executor, self._call, joined)
        return np.split(out, np.cumsum(sizes)[:-1]) if len(inputs) > 1 else [out]

    def close(self) -> None:
        """Release the version's runtime (an isolated one's process) once the calls already queued
        on its thread have run: requests that hold this runner finish on it."""
        self._executor.submit(self.served.predictor.close)

    def _call(self, x: np.ndarray) -> np.ndarray:
        self.metrics.batch(self.served.model_name, self.served.version, len(x))
        # A dynamic batch joins up to max_batch_size requests: its forward passes are bounded in
        # rows (serve.limits.max_batch_rows), whatever the requests hold.
        rows = min(max(len(x), 1), self.served.limits.max_batch_rows)
        return self.served.predictor.logits(x, batch_size=rows)


class ModelServer:
    """Serve deployment class (wrapped with ``serve.deployment`` when the app is built)."""

    def __init__(self, spec: ModelAppSpec):
        from kiln.models.predictor import load_predictor
        from kiln.monitor.live.config import MonitorConfig
        from kiln.monitor.live.metrics import MonitorMetrics
        from kiln.monitor.live.served import ReplicaMonitors
        from kiln.serve.metrics import ServeMetrics
        from kiln.tracking import resolve_model_dir

        self.spec = spec
        self.prefix = f"/v2/models/{spec.model_name}"
        self.metrics = ServeMetrics()
        self.limits = LimitsConfig.model_validate(spec.limits or {})
        self.runners: dict[str, VersionRunner] = {}
        monitor_cfg = MonitorConfig.model_validate(spec.monitor or {})
        self.monitors = ReplicaMonitors(
            spec.model_name,
            monitor_cfg,
            MonitorMetrics() if monitor_cfg.enabled else None,
            spec.tracking_uri,
            spec.run_dir,
            self._retrainable_version,
            spec.retrainer,
            spec.dashboard_url,
        )
        for source in spec.versions:
            directory = resolve_model_dir(source.uri, spec.tracking_uri)
            predictor = load_predictor(directory)
            runner = VersionRunner(
                ServedVersion(spec.model_name, source.version, predictor, self.limits),
                self.metrics,
            )
            runner.configure(BatchingConfig())
            self.runners[source.version] = runner
            self.monitors.add(source.version, directory)
            self.monitors.add_retraining(
                source.version, source.uri[len("models:/") :].split("/")[0]
            )
        self.default_version = spec.default_version
        self.batching = BatchingConfig()
        self._background: set[asyncio.Task] = set()  # shadow calls (a reference keeps them alive)
        from kiln.rollout.core.replica import RolloutAgent

        self.rollout = RolloutAgent(
            spec.model_name,
            spec.default_version,
            list(self.runners),
            self.add_version,
            self.quality_signals,
            self.remove_version,
            spec.run_dir,
        )
        self._reporter: asyncio.Task[None] | None = None
        # Serve runs the constructor on the replica's event loop; built elsewhere (tests): none
        try:
            self._reporter = asyncio.get_running_loop().create_task(self.rollout.run_forever())
        except RuntimeError:  # no running event loop
            pass

    def __del__(self):
        # Serve calls this when the replica stops cleanly (a killed one never gets here)
        rollout = getattr(self, "rollout", None)
        if rollout is not None:
            rollout.close()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's user_config: the batching settings, changeable in
        place."""
        batching = BatchingConfig.model_validate((user_config or {}).get("batching", {}))
        self.batching = batching
        for runner in self.runners.values():
            runner.configure(batching)

    @property
    def versions(self) -> list[str]:
        return list(self.runners)

    def route(self, request) -> str:
        """The version that answers an unversioned request (the default, or the rollout's
        choice)."""
        return self.rollout.route(request.headers)

    async def add_version(self, version: str, uri: str) -> None:
        """Load a version into this running replica (a rollout's candidate), smoke-check it, then
        serve it. Its model runs in a child process of the replica
        (``kiln.models.isolated_runtime``): a candidate that crashes its process fails its own
        requests only, never those of the versions running here."""
        from kiln.models.predictor import load_isolated_predictor
        from kiln.tracking import resolve_model_dir

        loop = asyncio.get_running_loop()
        directory = await loop.run_in_executor(None, resolve_model_dir, uri, self.spec.tracking_uri)
        predictor = await loop.run_in_executor(None, load_isolated_predictor, directory, uri)
        runner = VersionRunner(
            ServedVersion(self.spec.model_name, version, predictor, self.limits), self.metrics
        )
        shape = [2, *predictor.spec.input_shape]
        try:
            logits = await loop.run_in_executor(
                runner._executor, runner._call, np.zeros(shape, dtype=np.float32)
            )
            if logits.shape != (2, predictor.spec.num_classes) or not np.isfinite(logits).all():
                raise ValueError(
                    f"smoke request answered logits of shape {logits.shape} "
                    f"(finite: {bool(np.isfinite(logits).all())})"
                )
        except Exception:
            runner.close()
            raise
        runner.configure(self.batching)
        self.monitors.add(version, directory)  # its own reference: gates read its live window
        self.monitors.add_retraining(
            version, uri[len("models:/") :].split("/")[0]
        )  # should it become stable
        self.runners[version] = runner

    def _retrainable_version(self) -> str | None:
        """The stable version, or None while a rollout is in progress (retraining waits for its
        outcome)."""
        table = getattr(self, "rollout", None) and self.rollout.table
        if table is None:
            return self.default_version
        return None if table.candidate is not None else table.stable

    async def quality_signals(self, version: str) -> dict[str, float]:
        """This replica's live-window signals of ``version``: {"drift": score, "ood_rate": rate}; {}
        when it is not monitored or its window holds fewer than ``serve.monitor.min_rows`` rows (no
        data yet)."""
        return await self.monitors.signals(version)

    async def monitor_status(self, version: str | None = None, window: bool = False) -> dict:
        """The monitor report of one version (or all) as JSON; ``window`` adds the rows and
        reference."""
        return await self.monitors.report([version] if version else self.versions, window)

    def remove_version(self, version: str) -> None:
        """Stop serving a version a rollout loaded. Requests already holding its runner finish on it
        (its thread is not shut down under them; it goes with the runner)."""
        runner = self.runners.pop(version, None)
        if runner is not None:
            runner.close()
        self.monitors.remove(version)

    def runner(self, version: str) -> VersionRunner:
        found = self.runners.get(version)
        if found is None:
            raise ProtocolError(
                f"model '{self.spec.model_name}' has no served version '{version}' "
                f"(served: {', '.join(self.versions)})",
                404,
            )
        return found

    async def __call__(self, request):
        path = request.url.path
        rest = path[len(self.prefix) :] if path.startswith(self.prefix) else path
        parts = [p for p in rest.split("/") if p]
        version = None
        if len(parts) >= 2 and parts[0] == "versions":
            version, parts = parts[1], parts[2:]
        action = parts[0] if len(parts) == 1 else ("" if not parts else None)
        if action in ("infer", "predict"):
            if request.method != "POST":
                return method_not_allowed(request.method, path, "POST")
            return await self.infer(request, version, action)
        if action == "monitor":
            if request.method != "GET":
                return method_not_allowed(request.method, path, "GET")
            try:
                if version is not None:
                    self.runner(version)
                check_api_key(request.headers, self.spec.api_key_sha256)
            except CLIENT_ERRORS as exc:
                return error_response(str(exc), exc.status)
            window = request.query_params.get("window", "").lower() in ("1", "true", "yes")
            if window and self.spec.api_key_sha256 is None:
                # raw input rows and the training data's statistics: only to the key's holders
                return error_response(WINDOW_NEEDS_KEY, 403)
            return json_response(await self.monitor_status(version, window))
        if action in ("", "ready"):
            if request.method != "GET":
                return method_not_allowed(request.method, path, "GET")
            try:
                chosen = self.runner(version or self.route(request))
            except CLIENT_ERRORS as exc:
                return error_response(str(exc), exc.status)
            if action == "ready":
                return json_response(
                    {"name": self.spec.model_name, "version": chosen.served.version, "ready": True}
                )
            return json_response(chosen.served.metadata(self.versions))
        return error_response(
            f"no endpoint {path} (model endpoints: {self.prefix}[/versions/V][/ready|/infer|"
            "/predict|/monitor])",
            404,
        )

    async def infer(self, request, version: str | None, endpoint: str):
        """Answer an infer (OIP) or predict (convenience JSON) request; 4xx for every bad input."""

        async def answer(runner: VersionRunner, mirror: str | None):
            body = await read_body(request, self.spec.max_request_bytes)
            if endpoint == "infer":
                return await self._infer(runner, body, request.headers.get(HEADER_LENGTH), mirror)
            return await self._predict(runner, body, mirror)

        try:
            return await self.metered(request.headers, version, endpoint, answer)
        except CLIENT_ERRORS as exc:
            return error_response(str(exc), exc.status)
        except VersionLost as exc:
            return error_response(str(exc), exc.status, {"Retry-After": str(RETRY_AFTER_S)})
        except ServerFault as exc:
            return error_response(str(exc), exc.status)

    async def metered(
        self,
        headers,
        version: str | None,
        endpoint: str,
        answer: Callable[[VersionRunner, str | None], Awaitable[T]],
    ) -> T:
        """``answer(runner, mirror)`` for the version a request names (or the one routing picks),
        once its API key is checked; the one place a request is counted (metrics, the rollout's
        per-version stats), whichever protocol it came in by. Raises the client's errors
        (CLIENT_ERRORS) as they are, and ServerFault (logged with its traceback) for the rest."""
        started = time.perf_counter()
        status, label = 200, "-"
        try:
            runner = self.runner(version if version is not None else self.rollout.route(headers))
            label = runner.served.version
            self.rollout.begin(label)  # in flight until the finally below
            check_api_key(headers, self.spec.api_key_sha256)
            mirror = self.rollout.mirror_to(label) if version is None else None
            return await answer(runner, mirror)
        except CLIENT_ERRORS as exc:
            status = exc.status
            raise
        except RuntimeProcessDied as exc:  # its process crashed; this replica's versions answer on
            status = VersionLost.status
            self.rollout.lost(label, str(exc))
            raise VersionLost(
                f"version {label} of model '{self.spec.model_name}' is unavailable ({exc}); "
                f"retry in {RETRY_AFTER_S} s"
            ) from exc
        except Exception as exc:  # a server fault, not the client's: logged with its traceback
            status = 500
            logger.exception(
                "kiln: %s failed for model %s version %s", endpoint, self.spec.model_name, label
            )
            raise ServerFault(f"internal error: {type(exc).__name__}: {exc}") from exc
        finally:
            latency_ms = (time.perf_counter() - started) * 1000.0
            self.metrics.request(self.spec.model_name, label, endpoint, status, latency_ms)
            if label != "-":
                self.rollout.end(label)
                # a request naming its version is pinned: it never moves a rollout's gates
                self.rollout.record(label, status, latency_ms, routed=version is None)

    # --- the Open Inference Protocol over gRPC (the RPCs of GRPCInferenceService that name a
    # model; Ray Serve calls the ingress deployment's method of the RPC's name) -----------------

    async def ModelInfer(self, request, grpc_context=None):  # noqa: N802 (the RPC's name)
        """gRPC ModelInfer: the REST infer path's decoding, model call and accounting."""
        return grpc_reply(
            grpc_context, *await self.grpc_infer(request, metadata_headers(grpc_context))
        )

    async def ModelMetadata(self, request, grpc_context=None):  # noqa: N802
        """gRPC ModelMetadata of the version asked for (or the one routing picks)."""
        return grpc_reply(
            grpc_context, *self.grpc_metadata(request, metadata_headers(grpc_context))
        )

    async def ModelReady(self, request, grpc_context=None):  # noqa: N802
        """gRPC ModelReady: whether the version asked for (or the routed one) is served here."""
        return grpc_reply(grpc_context, *self.grpc_ready(request, metadata_headers(grpc_context)))

    async def grpc_forwarded(
        self, method: str, payload: bytes, headers: dict[str, str]
    ) -> tuple[bytes, int, str]:
        """A gRPC call the root app forwards by handle (one that reached the root app, not this
        one: through the Python proxy's ingress, or from a client that named the root app).
        Returns (the serialized response, HTTP-style status, message)."""
        if method == "ModelInfer":
            reply, status, message = await self.grpc_infer(
                oip_pb2.ModelInferRequest.FromString(payload), headers
            )
        elif method == "ModelMetadata":
            reply, status, message = self.grpc_metadata(
                oip_pb2.ModelMetadataRequest.FromString(payload), headers
            )
        else:
            reply, status, message = self.grpc_ready(
                oip_pb2.ModelReadyRequest.FromString(payload), headers
            )
        return reply.SerializeToString(), status, message

    def _check_name(self, name: str) -> None:
        if name != self.spec.model_name:
            raise ProtocolError(
                f"unknown model '{name}' (this application serves '{self.spec.model_name}')", 404
            )

    async def grpc_infer(self, msg, headers) -> tuple[Any, int, str]:
        """(ModelInferResponse, status, message) of a ModelInferRequest; status 200 or the HTTP
        status its error maps from (grpc_protocol.GRPC_CODES)."""
        size = msg.ByteSize()

        async def answer(runner: VersionRunner, mirror: str | None):
            self._check_name(msg.model_name)
            if size > self.spec.max_request_bytes:
                raise ProtocolError(
                    f"request of {size} bytes is over the limit of {self.spec.max_request_bytes} "
                    "bytes (serve.max_request_bytes)",
                    413,
                )
            req, outputs, ood = await self.run_infer(
                runner, lambda: grpc_infer_request(msg, self.limits), size, mirror
            )
            return grpc_infer_response(
                self.spec.model_name,
                runner.served.version,
                req.id,
                outputs,
                ood.parameters() if ood is not None else None,
            )

        try:
            return (
                await self.metered(headers, msg.model_version or None, "grpc_infer", answer),
                200,
                "",
            )
        except CLIENT_ERRORS as exc:
            return oip_pb2.ModelInferResponse(), exc.status, str(exc)
        except ServerFault as exc:
            return oip_pb2.ModelInferResponse(), exc.status, str(exc)

    def grpc_metadata(self, msg, headers) -> tuple[Any, int, str]:
        try:
            self._check_name(msg.name)
            chosen = self.runner(msg.version or self.rollout.route(headers))
        except CLIENT_ERRORS as exc:
            return oip_pb2.ModelMetadataResponse(), exc.status, str(exc)
        return metadata_response(chosen.served.metadata(self.versions)), 200, ""

    def grpc_ready(self, msg, headers) -> tuple[Any, int, str]:
        try:
            self._check_name(msg.name)
            self.runner(msg.version or self.rollout.route(headers))
        except CLIENT_ERRORS as exc:
            return oip_pb2.ModelReadyResponse(ready=False), exc.status, str(exc)
        return oip_pb2.ModelReadyResponse(ready=True), 200, ""

    def _shadow(self, version: str | None, prepare, logits: np.ndarray) -> None:
        """Mirror the request to ``version`` in the background: its answer is only compared, never
        returned. ``prepare(served_version)`` turns the request into that version's input (its own
        preprocessing)."""
        if version is None or version not in self.runners:
            return
        task = asyncio.get_running_loop().create_task(
            self._compare(self.runners[version], prepare, logits)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _compare(self, runner: VersionRunner, prepare, stable_logits: np.ndarray) -> None:
        started, status = time.perf_counter(), 200
        try:
            x = await asyncio.get_running_loop().run_in_executor(None, prepare, runner.served)
            logits = await runner.logits(x)
            # mirrored traffic is the candidate's too
            self.monitors.observe(runner.served.version, x, logits, softmax(logits))
            agreed = int((np.argmax(logits, axis=1) == np.argmax(stable_logits, axis=1)).sum())
            self.rollout.compare(runner.served.version, agreed, len(x))
        except RuntimeProcessDied as exc:  # the candidate's process crashed on a mirrored request
            status = VersionLost.status
            self.rollout.lost(runner.served.version, str(exc))
        except Exception:  # the candidate's fault: counted as its error, never the client's answer
            status = 500
        finally:
            self.rollout.record(
                runner.served.version, status, (time.perf_counter() - started) * 1000.0
            )

    async def _infer(
        self,
        runner: VersionRunner,
        body: bytes,
        header_length: str | None,
        mirror: str | None = None,
    ):
        from starlette.responses import Response

        req, outputs, ood = await self.run_infer(
            runner,
            lambda: parse_infer_request(body, header_length, self.limits),
            len(body),
            mirror,
        )
        content, headers = encode_infer_response(
            self.spec.model_name,
            runner.served.version,
            req.id,
            outputs,
            ood.parameters() if ood is not None else None,
        )
        return Response(content, status_code=200, headers=headers)

    async def run_infer(
        self,
        runner: VersionRunner,
        parse: Callable[[], InferRequest],
        size: int,
        mirror: str | None = None,
    ) -> tuple[InferRequest, list[tuple[Tensor, bool]], Any]:
        """The one model call of an OIP request, REST or gRPC: ``parse()`` (off the event loop for
        a request over ``OFFLOAD_BYTES``), the version's preprocessing, the model (batched), the
        monitors, the shadow call. Returns the request, its outputs and the OOD flags (or None)."""
        served = runner.served

        def prepare() -> tuple[InferRequest, np.ndarray]:
            req = parse()
            x = served.prepare_tensors(req.inputs)
            check_outputs(req, [o["name"] for o in served.output_metadata()])  # before compute
            return req, x

        req, x = await off_loop(prepare, size)
        logits = finite(await runner.logits(x))
        probs = softmax(logits)  # once per request: the answer and the monitor share it
        ood = self.monitors.observe(served.version, x, logits, probs)
        self._shadow(mirror, lambda other: other.prepare_tensors(req.inputs), logits)
        return req, select_outputs(req, served.output_tensors(probs)), ood

    async def _predict(self, runner: VersionRunner, body: bytes, mirror: str | None = None):
        from starlette.responses import Response

        served = runner.served

        def parse() -> tuple[Any, np.ndarray]:
            payload = load_json(body, limits=self.limits)
            return payload, served.prepare_json(payload)

        payload, x = await off_loop(parse, len(body))
        logits = finite(await runner.logits(x))
        probs = softmax(logits)  # once per request: the answer and the monitor share it
        ood = self.monitors.observe(served.version, x, logits, probs)
        self._shadow(mirror, lambda other: other.prepare_json(payload), logits)
        out: dict[str, Any] = {
            "model_name": self.spec.model_name,
            "model_version": served.version,
            "predictions": served.predictions(probs),
        }
        if ood is not None:
            out["parameters"] = ood.parameters()
        return Response(
            json.dumps(out, separators=(",", ":"), allow_nan=False).encode(),
            status_code=200,
            media_type="application/json",
        )
