"""``kiln serve start | stop``: deploy the plan on Ray Serve, wait until it runs, report; tear it
down.

Where it runs: ``--address`` (or RAY_ADDRESS) names a cluster; otherwise Kiln starts a local Ray
instance that outlives the CLI call (``instance.py``), recorded in ``RUN_DIR/serve/state.json``.
A start either ends with every model running, or fails with a clear message and leaves nothing
deployed (and stops the local instance it started).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compat import (
    GRPC_BIND_HOST_ENV,
    haproxy_error_file_env,
    haproxy_loopback_env,
    serve_controller_patience_env,
    serve_grpc_port,
)
from kiln.errors import ConfigError, KilnError, ResourceError, first_line, telling_line
from kiln.ray_connection import connected_dashboard_url
from kiln.rollout.core.inflight import forget_journals
from kiln.serve.app import (
    MODEL_APP_PREFIX,
    ROOT_APP,
    build_applications,
    model_app_name,
    model_route,
)
from kiln.serve.cluster import (
    connect,
    exposure_warning,
    find_target,
    forget,
    grpc_url,
    http_url,
    metrics_url,
    remove_apps,
    running_kiln_apps,
    serve_http,
    serve_running,
    shutdown_serve,
)
from kiln.serve.config import ServeConfig
from kiln.serve.http import unavailable_response
from kiln.serve.instance import (
    LocalRay,
    ServeState,
    free_port,
    free_port_block,
    load_state,
    local_ray_from,
    save_state,
    start_local_ray,
    state_dir,
)
from kiln.serve.plan import ServePlan, plan_serving
from kiln.serve.root_server import CONSOLE_PATH
from kiln.waiting import WaitTimeout, wait_until

if TYPE_CHECKING:
    from kiln.monitor.live.served import RetrainerFactory
    from kiln.serve.root_server import ConsoleFactory

logger = logging.getLogger("kiln.serve")
Progress = Callable[[str], None]
DIRECT_INGRESS_PORTS = 256  # replica ports HAProxy mode may hand out on this node
START_ATTEMPTS = 3  # Serve starts tried when a port Kiln picked is taken before it binds
DRAINING_PERIOD_S = 2.0  # how long a stopping ingress replica stays open behind HAProxy
# Attempts after the first for a request its replica dropped or refused. HAProxy counts an attempt
# on the dead replica (refused at once) too, and leastconn favours it (it holds no connection) until
# HAProxy marks it down: with 1, one request in about 5,000 still failed when a replica was killed.
INGRESS_RETRIES = 3
# Consecutive connection errors HAProxy sees on live traffic before it marks a replica down (Ray's
# default is 3): with 1 the first refused connection to a dead replica takes it out of leastconn's
# choice, so the retries go to a live one; a false mark-down is revived by the next health check
# (about 0.5 s). With 3, a request's own attempts could all land on the dead replica (a 503 in
# about one kill in ten, seen in test_serve_faults).
INGRESS_ERROR_LIMIT = 1
GRPC_SERVICER = "kiln.serve.oip_pb2.add_GRPCInferenceServiceServicer_to_server"
GRPC_MESSAGE_SIZE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"


@dataclass
class ServingHooks:
    """What the layers above serving plug into ``kiln serve start | stop`` (the commands layer
    composes them; serving imports none of those layers).

    ``restore(plan, run_dir)``: adjusts the plan once connected (the rollout control plane serves
    each model on its last promoted version). ``on_stop(models)``: runs before the models'
    applications are deleted (their rollout controllers go). ``retrainer``: builds each replica's
    retraining loop of a version (``serve.monitor.retrain``); pickled into the replicas by
    reference. ``console``: builds the handler of ``/console/`` in the root app's replica (the
    Kiln console, ``kiln.console``); pickled by reference too.
    """

    restore: Callable[[ServePlan, str | Path], ServePlan] | None = None
    on_stop: Callable[[list[str]], None] | None = None
    retrainer: RetrainerFactory | None = None
    console: ConsoleFactory | None = None


@dataclass
class ServedModelInfo:
    name: str
    version: str
    infer_url: str
    default: bool
    format: str = ""
    uri: str = ""  # the registry version it loads (models:/NAME/VERSION)


@dataclass
class ServeInfo:
    """What ``kiln serve start`` reports (the ``--json`` line)."""

    url: str
    models: list[ServedModelInfo]
    ingress: str
    ray_address: str
    metrics_url: str | None = None
    local_ray_pid: int | None = None
    api_key_required: bool = False
    grpc_url: str | None = None  # host:port of the OIP gRPC service (tritonclient.grpc's url)
    console_url: str | None = None  # the Kiln console, when serving was started with one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def haproxy_env(base_dir: Path) -> dict[str, str]:
    """Environment for Serve's HAProxy ingress with this instance's own files and ports.

    Ray's defaults (/tmp/haproxy-serve, stats port 8404, metrics port 9101, replica ports 30000+)
    would collide with any other Serve instance using HAProxy on the same machine.
    """
    base_dir.mkdir(parents=True, exist_ok=True)
    http_low, grpc_low = (
        free_port_block(DIRECT_INGRESS_PORTS),
        free_port_block(DIRECT_INGRESS_PORTS),
    )
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(base_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(base_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(base_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(base_dir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(base_dir / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http_low),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http_low + DIRECT_INGRESS_PORTS),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc_low),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc_low + DIRECT_INGRESS_PORTS),
        # A stopping ingress replica stays open this long so that HAProxy deregisters it (and
        # HAProxy retries a refused connection on another replica). Ray's 30 s suits a remote load
        # balancer's health checks; Serve's HAProxy is told by the controller within a second, and
        # 30 s made every stop, redeploy and failed start wait half a minute per replica.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(DRAINING_PERIOD_S),
    }


def haproxy_fault_env() -> dict[str, str]:
    """Environment for Serve's HAProxy ingress that hides a replica's death from clients.

    An inference request whose replica closed the connection before any answer (it died) or
    refused it is sent again, redispatched (``retry-on conn-failure empty-response``,
    ``retries 3``, and the template's ``option redispatch 1``; the first refused connection marks
    the replica down, ``observe layer4 error-limit 1``); HAProxy can replay only a request
    it still holds whole, so bodies over its buffer (16 KiB, ``RAY_SERVE_HAPROXY_TUNE_BUFSIZE``)
    are not retried. Once an answer has started nothing is retried. What still fails (no replica
    up, the retry failed too) is Kiln's JSON error, 503 with ``Retry-After``, instead of Serve's
    plain-text 500 (``kiln.compat.use_kiln_haproxy_error_file``)."""
    return {
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
        "RAY_SERVE_HAPROXY_RETRIES": str(INGRESS_RETRIES),
        "RAY_SERVE_HAPROXY_OBSERVE_MARK_DOWN_ENABLED": "1",
        "RAY_SERVE_HAPROXY_OBSERVE_ERROR_LIMIT": str(INGRESS_ERROR_LIMIT),
        **haproxy_error_file_env(unavailable_response()),
    }


def check_serving_fits(plan: ServePlan) -> None:
    """ResourceError at once when the models' replicas can never fit on the cluster's nodes."""
    import ray

    from kiln.ray_connection import placeable_slots

    total = ray.cluster_resources().get("CPU", 0.0)
    for model in plan.models:
        d = model.deployment
        slots = placeable_slots({"CPU": d.num_cpus})
        if slots < d.min_replicas:
            raise ResourceError(
                f"model '{model.name}' needs {d.min_replicas} replica(s) of {d.num_cpus:g} CPU but "
                "the "
                f"cluster's nodes can hold only {slots} (it has {total:g} CPU); lower "
                "serve.deployment.num_cpus or replicas"
            )
    need = sum(m.min_cpus for m in plan.models)
    if need > total + 1e-9:
        parts = ", ".join(
            f"{m.name} {m.deployment.min_replicas} x {m.deployment.num_cpus:g}" for m in plan.models
        )
        raise ResourceError(
            f"the served models need {need:g} CPU for their replicas ({parts}) but the cluster has "
            f"{total:g}; lower serve.deployment.num_cpus or replicas"
        )


def wait_until_running(app_names: list[str], timeout: float, plan: ServePlan) -> None:
    """Return when every app RUNS. Raises KilnError at once on DEPLOY_FAILED, ResourceError after
    ``timeout`` (naming what is pending and why)."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    def running() -> bool:
        apps = serve.status().applications
        for name in app_names:
            app = apps.get(name)
            if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
                raise KilnError(f"serving '{name}' failed to deploy: {telling_line(app.message)}")
        return all(
            name in apps and apps[name].status == ApplicationStatus.RUNNING for name in app_names
        )

    try:
        wait_until(running, timeout, "the models to run", interval=0.25, max_interval=0.5)
    except WaitTimeout:
        apps = serve.status().applications
        raise ResourceError(
            f"the models were not running after {timeout:g}s: {_pending(apps, app_names, plan)}"
        ) from None


def _pending(apps: dict[str, Any], app_names: list[str], plan: ServePlan) -> str:
    """What keeps each app in ``app_names`` from running, and the cluster's free CPUs."""
    import ray
    from ray.serve.schema import ApplicationStatus

    free = ray.available_resources().get("CPU", 0.0)
    cpus = {model_app_name(m.name): m for m in plan.models}
    parts = []
    for name in app_names:
        app = apps.get(name)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            continue
        model = cpus.get(name)
        need = (
            f" ({model.deployment.min_replicas} replica(s) x {model.deployment.num_cpus:g} CPU)"
            if model
            else ""
        )
        message = ""
        if app is not None:
            messages = [d.message for d in app.deployments.values() if d.message]
            message = f": {telling_line(messages[0])}" if messages else ""
        state = getattr(app.status, "value", app.status) if app else "not deployed"
        parts.append(f"'{name}'{need} is {state}{message}")
    return "; ".join(parts) + f" (the cluster has {free:g} CPU free; other work may hold the rest)"


def start_serving(
    cfg: ServeConfig,
    tracking_uri: str,
    run_dir: str | Path,
    address: str | None = None,
    api_key: str | None = None,
    progress: Progress = lambda _: None,
    debug: bool = False,
    hooks: ServingHooks | None = None,
    warn: Progress = lambda text: logger.warning("kiln serve: %s", text),
) -> ServeInfo:
    """Deploy every model of ``cfg`` and wait until they run; ``hooks`` plug in the layers above
    (rollout records, retraining); ``warn`` gets what the user should be warned of (an endpoint
    bound beyond loopback without an API key). Returns what serves where. Raises KilnError
    (nothing left deployed)."""
    from kiln.serve.http import key_digest

    hooks = hooks or ServingHooks()
    address = address or os.environ.get("RAY_ADDRESS") or None
    local: LocalRay | None = None
    state = load_state(run_dir)
    running_local = state.local() if state is not None and address is None else None
    if state is not None and running_local is not None and running_local.alive():
        raise KilnError(
            f"Kiln is already serving at {state.url} (local Ray instance, pid "
            f"{running_local.pid}); run 'kiln serve stop' first"
        )
    plan = plan_serving(cfg, tracking_uri)
    plan.run_dir = str(Path(run_dir).expanduser().resolve())
    progress(f"serving {plan.describe()}")
    exposed = exposure_warning(cfg.host, api_key is not None)
    if exposed:
        warn(exposed)
    if address is None:
        progress(
            "starting a local Ray instance (it keeps running after this command; stop it with kiln "
            "serve stop)"
        )
        local = start_local_ray(
            state_dir(run_dir), cfg.num_cpus, secrets=[cfg.api_key_env] if cfg.api_key_env else []
        )
        address = local.address
    deployed: list[str] = []
    haproxy_dir: str | None = None
    started_serve = False
    try:
        gcs = connect(address, debug)
        from ray import serve

        running = running_kiln_apps()
        if running:
            raise KilnError(
                f"Kiln is already serving on the Ray cluster at {gcs} (applications: "
                f"{', '.join(sorted(running))}); run 'kiln serve stop --address {address}' first"
            )
        if hooks.restore is not None:
            plan = hooks.restore(plan, run_dir)
        check_serving_fits(plan)
        started_serve = not serve_running()
        for attempt in range(1, START_ATTEMPTS + 1):
            port = cfg.port or free_port()
            grpc_options = grpc_serving_options(cfg)
            # Serve's controller and the actors it starts (HAProxy's manager, the proxies) run
            # Kiln's setup hook (kiln.compat): HAProxy's stats on loopback, gRPC calls routed to
            # Kiln's apps.
            env = {
                **haproxy_loopback_env(),
                **serve_controller_patience_env(),
                **grpc_process_env(cfg),
            }
            if cfg.ingress == "haproxy":
                # HAProxy's unix sockets live under this folder plus a 56-character node id and
                # must fit 97 bytes: a short folder of its own, removed by `kiln serve stop`.
                haproxy_dir = tempfile.mkdtemp(prefix="khap-", dir="/tmp")
                env = {**haproxy_env(Path(haproxy_dir)), **env, **haproxy_fault_env()}
            try:
                serve.start(
                    http_options={"host": cfg.host, "port": port},
                    grpc_options=grpc_options,
                    controller_options={"runtime_env": {"env_vars": env}},
                )
                break
            except Exception as exc:
                taken = taken_port(str(exc))
                if taken is not None and taken in (cfg.port, cfg.grpc_port):
                    raise ConfigError(
                        f"port {taken} is in use on this machine (serve.port / serve.grpc_port); "
                        "choose another, or 0 for a free one"
                    ) from exc
                if taken is None or not started_serve or attempt == START_ATTEMPTS:
                    raise KilnError(f"Ray Serve did not start: {telling_line(str(exc))}") from exc
                # A port Kiln picked was taken before its listener bound it: pick them all again.
                progress(f"port {taken} was taken meanwhile; starting Ray Serve again")
                _undo([], None, started_serve)
                if haproxy_dir:
                    shutil.rmtree(haproxy_dir, ignore_errors=True)
                    haproxy_dir = None
        host, port = _check_http(cfg.host, port)
        grpc_port = _check_grpc(cfg, grpc_options)
        dashboard = connected_dashboard_url()  # captured here: replicas only know a default
        targets = build_applications(
            plan,
            key_digest(api_key) if api_key else None,
            hooks.retrainer,
            dashboard if hooks.retrainer is not None else None,
            hooks.console,
            grpc_process_env(cfg) if grpc_options is not None else None,
        )
        deployed = [t.name for t in targets]
        progress(f"deploying {len(plan.models)} model(s) on Ray Serve at {gcs}")
        serve.run_many(
            targets, wait_for_ingress_deployment_creation=False, wait_for_applications_running=False
        )
        wait_until_running(deployed, cfg.start_timeout_s, plan)
        url = http_url(host, port)
        info = ServeInfo(
            url=url,
            ingress=cfg.ingress,
            ray_address=gcs,
            metrics_url=metrics_url(),
            local_ray_pid=local.pid if local else None,
            api_key_required=api_key is not None,
            console_url=f"{url}{CONSOLE_PATH}/" if hooks.console is not None else None,
            grpc_url=grpc_url(host, grpc_port) if grpc_port else None,
            models=[
                ServedModelInfo(
                    name=m.name,
                    version=v.version,
                    infer_url=f"{url}{model_route(m.name)}/versions/{v.version}/infer",
                    default=v.version == m.default_version,
                    format=m.formats[v.version],
                    uri=v.uri,
                )
                for m in plan.models
                for v in m.versions
            ],
        )
    except BaseException:
        _undo(deployed, local, started_serve)
        if haproxy_dir:
            shutil.rmtree(haproxy_dir, ignore_errors=True)
        raise
    save_state(
        run_dir,
        ServeState(
            address=address if local is None else local.address,
            url=info.url,
            ingress=cfg.ingress,
            models=[asdict(m) for m in info.models],
            metrics_url=info.metrics_url,
            started_at=time.time(),
            haproxy_dir=haproxy_dir,
            local_ray=local_ray_from(local) if local else None,
            tracking_uri=plan.tracking_uri,
            dashboard_url=dashboard,
            console_url=info.console_url,
            grpc_url=info.grpc_url,
        ),
    )
    return info


# "cannot bind socket (Address already in use) for [127.0.0.1:38587]" (HAProxy), "error while
# attempting to bind on address ('127.0.0.1', 38587): address already in use" (uvicorn)
_BOUND_ADDRESS = re.compile(r"\[[^\]\s]*:(\d+)\]|\('[^']*', (\d+)\)")


def taken_port(message: str) -> int | None:
    """The port a listener failed to bind because it was in use, from an error's text (-1 when the
    text says so without naming the port); None when that is not the failure."""
    for line in message.splitlines():
        if "address already in use" in line.lower():
            found = _BOUND_ADDRESS.findall(line)  # the address comes last (HAProxy names its file)
            return int(found[-1][0] or found[-1][1]) if found else -1
    return None


def _check_http(host: str, port: int) -> tuple[str, int]:
    """Serve's HTTP options are fixed when it first starts on a cluster: fail if it listens
    elsewhere. Returns (host, port). Raises ConfigError."""
    actual_host, actual_port = serve_http()
    if (actual_host, actual_port) != (host, int(port)):
        raise ConfigError(
            f"Ray Serve already runs on this cluster with HTTP at {actual_host}:{actual_port}; "
            f"serve.host/serve.port must match it (asked for {host}:{port})"
        )
    return actual_host, actual_port


def grpc_serving_options(cfg: ServeConfig) -> Any:
    """Serve's gRPC options for ``cfg``: the KServe v2 service on ``serve.grpc_port`` (a free port
    when unset), or none (``serve.grpc: false``)."""
    from ray.serve.config import gRPCOptions

    if not cfg.grpc:
        return None
    return gRPCOptions(
        port=cfg.grpc_port or free_port(),
        grpc_servicer_functions=[GRPC_SERVICER],
    )


def grpc_process_env(cfg: ServeConfig) -> dict[str, str]:
    """For the environment of Serve's controller (its proxies) and of every ingress replica:
    Kiln's setup hook (kiln.compat), the host Serve's gRPC servers bind (``serve.host``, where
    Ray would bind every interface), and their largest message: Ray's 2 GiB by default, Kiln's
    ``serve.max_request_bytes`` (a larger message is refused before it is read whole)."""
    return {
        **haproxy_loopback_env(),
        GRPC_BIND_HOST_ENV: cfg.host,
        GRPC_MESSAGE_SIZE_ENV: str(cfg.max_request_bytes),
    }


def _check_grpc(cfg: ServeConfig, options: Any) -> int | None:
    """The port gRPC serves on, once Serve runs. Serve's gRPC options are fixed when it first
    starts on a cluster: ConfigError when it serves gRPC elsewhere (or not) than asked."""
    actual = serve_grpc_port()
    if options is None:
        return actual
    if actual is None:
        raise ConfigError(
            "Ray Serve already runs on this cluster without gRPC; set serve.grpc: false, or "
            "serve on a cluster where Serve is not started yet"
        )
    if cfg.grpc_port and actual != cfg.grpc_port:
        raise ConfigError(
            f"Ray Serve already runs on this cluster with gRPC on port {actual}; serve.grpc_port "
            f"must match it (asked for {cfg.grpc_port})"
        )
    return actual


def _undo(deployed: list[str], local: LocalRay | None, started_serve: bool) -> None:
    """After a failed start: the local instance it started goes; else what it deployed (and Serve,
    if it started Serve and nothing else runs there)."""
    if local is not None:
        import ray

        ray.shutdown()  # disconnect first: a driver whose GCS disappears aborts the whole process
        local.stop()
        return
    try:
        if deployed:
            remove_apps(deployed)
        elif started_serve:
            shutdown_serve()
    except Exception as exc:  # best effort: the original error is what the user needs to see
        logger.warning("kiln serve: cleaning up after a failed start failed: %s", first_line(exc))


@dataclass
class StopResult:
    stopped: list[str]
    local_ray_pid: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stop_serving(
    run_dir: str | Path,
    address: str | None = None,
    debug: bool = False,
    hooks: ServingHooks | None = None,
) -> StopResult:
    """Delete Kiln's applications (after ``hooks.on_stop``); stop the local Ray instance if Kiln
    started it. Returns what stopped. Raises KilnError."""
    address, state = find_target(run_dir, address)
    local = state.local() if state and state.address == address else None
    if state is not None and local is not None:
        pid, alive = local.pid, local.alive()
        local.stop()
        forget(run_dir, state)
        forget_journals(run_dir)  # its replicas died with it, their in-flight files left behind
        if not alive:
            raise KilnError(f"the local Ray instance that served (pid {pid}) was already gone")
        return StopResult(
            stopped=sorted({ROOT_APP, *(model_app_name(m["name"]) for m in state.models)}),
            local_ray_pid=pid,
        )
    connect(address, debug)
    apps = sorted(running_kiln_apps())
    if not apps:
        if state and state.address == address:
            forget(run_dir, state)
        raise KilnError(f"Kiln serves nothing on the Ray cluster at {address}")
    if hooks is not None and hooks.on_stop is not None:
        hooks.on_stop(
            [app[len(MODEL_APP_PREFIX) :] for app in apps if app.startswith(MODEL_APP_PREFIX)]
        )
    remove_apps(apps)
    if state and state.address == address:
        forget(run_dir, state)
    forget_journals(run_dir)
    return StopResult(stopped=apps, local_ray_pid=None)
