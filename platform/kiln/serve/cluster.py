"""Talking to the Ray cluster that serves: connecting, Kiln's Serve applications, where things
listen."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from kiln.compat import serve_controller_alive, serve_http_address
from kiln.errors import KilnError
from kiln.serve.app import is_kiln_app
from kiln.serve.instance import LOCAL_ONLY_ENV, ServeState, clear_state, load_state, state_dir
from kiln.waiting import WaitTimeout, wait_until

LOCAL_AUTH_MODE = "token"  # Kiln's local instance runs with Ray's token authentication


def connect(address: str, debug: bool = False, serve: bool = True) -> str:
    """Connect this process to the Ray cluster at ``address``; returns its GCS address. Raises
    KilnError when nothing answers there. ``serve``: this process will call Ray Serve (imported
    now, its start-up logging quieted); the rollout commands, which only call the controller actor,
    pass False and skip that import (seconds).

    Kiln's local instance uses token authentication: Ray reads its mode from ``RAY_AUTH_MODE`` once
    per process, so the entry point sets it (``serving_env``) before Ray is imported."""
    import logging

    from kiln.ray_connection import ensure_ray

    if serve and not debug:  # Serve logs its start-up at INFO; the CLI prints its own summary
        import ray.serve  # noqa: F401  (configures its logger on import: set the level after that)

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    # Serving keeps glibc's arena per thread (JOB_WORKER_ENV is for training jobs, whose loop runs
    # in one thread): a replica's threads (its event loop, its inference) allocate at once.
    return ensure_ray(address, debug=debug, worker_env={})


def serving_env(run_dir: str | Path, address: str | None, starting: bool = False) -> dict[str, str]:
    """The environment a process needs before it imports Ray to reach what serves from ``run_dir``
    (``starting``: what ``kiln serve start`` will serve): when that is Kiln's local instance,
    ``RAY_AUTH_MODE=token`` and Ray's single-node mode (the instance's GCS listens on loopback
    only, and a driver in Ray's default mode would dial the machine's outside address instead);
    nothing otherwise. The entry point sets it (library code never writes
    ``os.environ``); a variable the user set already is left as it is."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if starting:
        local = address is None
    else:
        state = load_state(run_dir)
        target = address or (state.address if state else None)
        local = state is not None and state.local_ray is not None and state.address == target
    return {"RAY_AUTH_MODE": LOCAL_AUTH_MODE, LOCAL_ONLY_ENV: "0"} if local else {}


def http_url(host: str, port: int) -> str:
    """The base URL a client on this machine uses (an all-interfaces bind is reachable on
    loopback)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{shown}:{port}"


def grpc_url(host: str, port: int) -> str:
    """``host:port`` of the gRPC service as a client on this machine dials it (tritonclient.grpc's
    ``url``)."""
    return http_url(host, port).removeprefix("http://")


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an interface to bind) is reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def exposure_warning(host: str, api_key_required: bool) -> str | None:
    """The warning ``kiln serve start`` prints when the endpoint binds beyond loopback with no API
    key (anyone who reaches the machine can call the models); None otherwise."""
    if is_loopback_host(host) or api_key_required:
        return None
    return (
        f"serving on {host} without an API key: anyone who can reach this machine can call the "
        "models; set serve.api_key_env (--api-key-env), or bind to 127.0.0.1"
    )


def metrics_url() -> str | None:
    """The Prometheus endpoint of Ray's metrics agent on the head node (where Kiln's metrics are
    exported)."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None


def running_kiln_apps() -> dict[str, Any]:
    """Kiln's Serve applications on the connected cluster: name -> ApplicationStatusOverview."""
    from ray import serve

    return {name: app for name, app in serve.status().applications.items() if is_kiln_app(name)}


def serve_running() -> bool:
    """Whether Ray Serve runs (has a controller) on the connected cluster."""
    return serve_http_address() is not None


def serve_http() -> tuple[str, int]:
    """(host, port) of Serve's HTTP ingress on the connected cluster. Raises KilnError when Serve
    does not run there."""
    found = serve_http_address()
    if found is None:
        raise KilnError("Ray Serve does not run on the connected cluster")
    return found


def remove_apps(names: list[str]) -> None:
    """Delete Serve applications (each call returns once it is gone); if no other application is
    left on the cluster, shut Serve down, so that the next start chooses its HTTP host and port
    afresh (Serve fixes them when it starts)."""
    from ray import serve

    if set(serve.status().applications) <= set(names):
        shutdown_serve()
        return
    for name in names:
        serve.delete(name)


SHUTDOWN_TIMEOUT_S = 120.0  # Serve's own graceful shutdown waits 30 s, then our wait for its end


def shutdown_serve() -> None:
    """Shut Ray Serve down on the connected cluster and return once its controller is gone, so
    that a start right after (the next ``kiln serve start``) gets a new Serve, not the dying one.
    Raises KilnError when the controller outlives SHUTDOWN_TIMEOUT_S."""
    from ray import serve

    serve.shutdown()
    try:
        wait_until(lambda: not serve_controller_alive(), SHUTDOWN_TIMEOUT_S, "Serve to stop")
    except WaitTimeout:
        raise KilnError(
            f"Ray Serve's controller still runs {SHUTDOWN_TIMEOUT_S:.0f}s after its shutdown; "
            "run the stop again"
        ) from None


def find_target(run_dir: str | Path, address: str | None) -> tuple[str, ServeState | None]:
    """The cluster to ask (``--address``, RAY_ADDRESS, else the state file's) and the state file, if
    any. Raises KilnError when there is neither."""
    state = load_state(run_dir)
    address = address or os.environ.get("RAY_ADDRESS") or (state.address if state else None)
    if not address:
        raise KilnError(
            f"nothing is being served from {state_dir(run_dir)} (no state file); start with "
            "'kiln serve start', or pass --address of the cluster that serves"
        )
    return address, state


def forget(run_dir: str | Path, state: ServeState) -> None:
    """Remove the state file and the HAProxy files it points to."""
    if state.haproxy_dir:
        shutil.rmtree(state.haproxy_dir, ignore_errors=True)
    clear_state(run_dir)
