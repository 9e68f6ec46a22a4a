"""The one place that starts or connects to Ray, and checks that work can be placed; and the Ray
auth token a connection sends.

The process environment Ray reads at import (progress bars, log dedup, usage stats, Train V2) is
set by the entry points (``kiln.entry.configure_process``), never here.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.compat import drop_worker_pool_warnings
from kiln.errors import KilnError, ResourceError, first_line

# Ray starts its workers at niceness 15 (its `worker_niceness`), below every other process. On
# the instances Kiln starts on a user's machine the workers are the job: at 15, any other process
# (the driver, Ray's own daemons, a load generator) preempts them, and torch's OpenMP threads then
# wait on each other. Ray's Jobs API sets the same variable to 0 for its job supervisors. A
# cluster Kiln joins keeps its operator's setting.
LOCAL_WORKER_ENV = {"RAY_worker_niceness": "0"}

# Ray runs a training function (Ray Train's, a Tune trial's) in a thread of its worker process, and
# glibc's malloc gives such a thread an arena of its own, made of 64 MB heaps that glibc unmaps as
# soon as one empties, whatever its trim threshold (``kiln.train.loop.keep_freed_memory``): each
# step's activations were mapped and faulted in again, 40,000-120,000 page faults per epoch of the
# benchmark's CNN in the training thread (as many in its OpenMP thread), in most epochs (depending
# on where the heap's blocks fell; BENCHMARKS, training throughput). With one arena every thread
# allocates from the main heap, which keeps what it frees. glibc reads the variable when a process
# starts, so it goes into the job's runtime env (every worker of the job starts with it); a
# caller's or a submitted job's own setting wins.
JOB_WORKER_ENV = {"MALLOC_ARENA_MAX": "1"}


def with_worker_env(
    runtime_env: dict[str, Any] | None, env: dict[str, str]
) -> dict[str, Any] | None:
    """``runtime_env`` with ``env``'s variables added to its env_vars, each only where neither it
    nor the runtime env of the job this driver was submitted in sets that variable (Ray refuses a
    variable set by both); ``runtime_env`` itself when nothing is added."""
    given = dict(runtime_env or {})
    taken = {**_submitted_job_env().get("env_vars", {}), **(given.get("env_vars") or {})}
    added = {k: v for k, v in env.items() if k not in taken}
    if not added:
        return runtime_env
    given["env_vars"] = {**added, **(given.get("env_vars") or {})}
    return given


def local_runtime_env(
    runtime_env: dict[str, Any] | None, worker_env: dict[str, str] = JOB_WORKER_ENV
) -> dict[str, Any] | None:
    """``runtime_env`` for a local instance Kiln starts: its workers at normal priority
    (LOCAL_WORKER_ENV) and started with ``worker_env``, unless the caller's env_vars say
    otherwise."""
    return with_worker_env(runtime_env, {**LOCAL_WORKER_ENV, **worker_env})


PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Refusal:
    """Why nothing accepted a TCP connection: the OS's reason, and whether it is that the host
    name does not resolve (a typo in an address, not a cluster that is down)."""

    reason: str  # the OS's words, e.g. 'Connection refused', 'Name or service not known'
    unknown_host: bool = False

    def describe(self, host: str) -> str:
        """The refusal as a clause: "nothing answers (...)" or "host 'H' does not resolve (...)"."""
        if self.unknown_host:
            return f"host '{host}' does not resolve ({self.reason})"
        return f"nothing answers ({self.reason})"


def tcp_refusal(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> Refusal | None:
    """Why nothing accepts a TCP connection at ``host:port``, or None when something does."""
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except socket.gaierror as exc:  # before OSError, its base: the name lookup failed
        return Refusal(exc.strerror or str(exc), unknown_host=True)
    except OSError as exc:
        return Refusal(exc.strerror or type(exc).__name__)
    return None


def check_ray_address(address: str) -> None:
    """Raise KilnError unless something accepts a TCP connection at ``address`` (``host:port`` or
    ``ray://host:port``; 'auto' and other forms are left to Ray). Ray's own connect retries an
    unreachable GCS for minutes, logging warnings, before it gives up."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    host = host.strip("[]")
    refusal = tcp_refusal(host, int(port))
    if refusal is not None:
        raise KilnError(f"cannot reach Ray at {address}: {refusal.describe(host)}")


def ensure_ray(
    address: str | None = None,
    num_cpus: float | None = None,
    debug: bool = False,
    runtime_env: dict[str, Any] | None = None,
    worker_env: dict[str, str] = JOB_WORKER_ENV,
) -> str:
    """Connect to ``address`` (or RAY_ADDRESS), else start a local instance. Returns the address.

    The local instance binds its dashboard to 127.0.0.1. The job's workers start with
    ``worker_env`` (default JOB_WORKER_ENV: the training jobs'). Raises KilnError when an address
    is given but nothing answers there.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = address or os.environ.get("RAY_ADDRESS") or None
    level = logging.DEBUG if debug else logging.ERROR
    if address and address.startswith("http"):
        raise KilnError(
            f"--address {address}: give the Ray cluster address (host:6379 or 'auto'), "
            "not the dashboard URL; use 'kiln submit' to send jobs through the Jobs API"
        )
    if address:
        check_ray_address(address)
    try:
        if address:
            ray.init(
                address=address,
                runtime_env=with_kiln_package(with_worker_env(runtime_env, worker_env)),
                logging_level=level,
                log_to_driver=debug,
                configure_logging=True,
            )
        else:
            # address="local": always a new instance; with None Ray would join whatever cluster
            # /tmp/ray/ray_current_cluster names (another user's, on a shared machine).
            ray.init(
                address="local",
                # Ray takes fractional CPUs too, though its signature says int.
                num_cpus=num_cpus,  # type: ignore[arg-type]
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                runtime_env=local_runtime_env(runtime_env, worker_env),
                logging_level=level,
                log_to_driver=debug,
                configure_logging=True,
            )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "a new local instance"
        raise KilnError(
            f"cannot reach Ray at {where} ({first_line(exc)}){_auth_hint(address)}"
        ) from None
    if not debug:  # as for log_to_driver: Ray's advice for its own developers only under --debug
        drop_worker_pool_warnings()
    return ray.get_runtime_context().gcs_address


def _auth_hint(address: str | None) -> str:
    """What to add to a failed connect to ``address``: Ray sends its auth token to an address the
    user names only in token mode (``RAY_AUTH_MODE=token``; a token is not handed to any server
    named), so a cluster with token authentication refuses a client without that setting, after
    Ray's connect has retried for 20 s. Say so when a token is there and the mode is unset."""
    if not address or os.environ.get(AUTH_MODE_ENV) or find_token() is None:
        return ""
    return (
        f"; if the cluster uses token authentication, set {AUTH_MODE_ENV}=token (a token is at "
        f"{token_source()}; Ray sends it to a named address only then)"
    )


def connected_dashboard_url() -> str | None:
    """The dashboard (Jobs API) URL of the cluster this process is connected to (``http://HOST:PORT``);
    None when Ray is not initialised here or the cluster runs no dashboard.

    Public API: ``ray.init`` on a connected process returns the connected cluster's context without
    a restart. Read it in a driver: a worker (a Serve replica) only knows a default address, so
    serving captures it at start and hands it to the replicas."""
    import ray

    if not ray.is_initialized():
        return None
    url = ray.init(ignore_reinit_error=True).dashboard_url
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def _submitted_job_env() -> dict[str, Any]:
    """The runtime env of the Ray job this driver runs in when it was submitted through the Jobs
    API (Ray hands it to the entrypoint in RAY_JOB_CONFIG_JSON_ENV_VAR); empty otherwise."""
    import json

    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return job.get("runtime_env") or {}


# The kiln package folder this process runs (shipped to workers as a py_module).
KILN_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def with_kiln_package(runtime_env: dict[str, Any] | None) -> dict[str, Any] | None:
    """The runtime env of a driver joining an existing cluster: ``runtime_env`` plus the kiln
    package this driver runs, as a py_module, so that every worker runs the driver's kiln (a node
    may have another kiln installed, or none). Unchanged when the caller or the submitted job's
    runtime env already ships py_modules (``kiln submit`` does; Ray refuses two py_modules
    fields)."""
    given = {**_submitted_job_env(), **(runtime_env or {})}
    if "py_modules" in given:
        return runtime_env
    extra: dict[str, Any] = {"py_modules": [KILN_PACKAGE_DIR]}
    if "excludes" not in given:
        extra["excludes"] = ["__pycache__", "*.pyc"]
    return {**(runtime_env or {}), **extra}


def placeable_slots(per_worker: dict[str, float]) -> int:
    """How many bundles of ``per_worker`` resources the cluster's live nodes can hold in total."""
    import ray

    slots = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        fits = min(
            (math.floor(res.get(k, 0.0) / v + 1e-9) for k, v in per_worker.items() if v > 0),
            default=0,
        )
        slots += fits
    return slots


def check_placement(
    workers: int, per_worker: dict[str, float], what: str = "train.workers"
) -> None:
    """Raise ResourceError at once when ``workers`` bundles can never fit on the cluster's nodes."""
    import ray

    slots = placeable_slots(per_worker)
    if slots < workers:
        total = ray.cluster_resources()
        have = ", ".join(f"{total.get(k, 0):g} {k}" for k in per_worker)
        need = ", ".join(f"{v:g} {k}" for k, v in per_worker.items())
        raise ResourceError(
            f"{what}={workers} needs {workers} x ({need}) but the cluster can place only {slots} "
            f"(it has {have} in all); lower {what} or the per-worker resources"
        )


# ---- Ray token authentication, client side -------------------------------------------------------
# Ray (2.60) protects a cluster's dashboard and Jobs API with a bearer token when the cluster runs
# with ``RAY_AUTH_MODE=token``. Ray's own SDK sends the token only when the *client* also sets that
# mode; Kiln sends it whenever one is found, so submitting to a protected cluster needs no extra
# setting.

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


def default_token_path() -> Path:
    """Where ``ray get-auth-token --generate`` writes the token: ``~/.ray/auth_token``."""
    return Path.home() / ".ray" / "auth_token"


def token_source() -> str:
    """Where :func:`find_token` looks first, in words (for error messages)."""
    if os.environ.get(TOKEN_ENV):
        return f"${TOKEN_ENV}"
    if os.environ.get(TOKEN_PATH_ENV):
        return os.environ[TOKEN_PATH_ENV]
    return str(default_token_path())


def secure_token_file() -> Path | None:
    """Make the token file (``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) readable by its
    owner only (0600), and ``~/.ray`` a 0700 folder: Ray writes them with the default umask.
    Returns the file, or None when the token is not in a file. OSError when they are not ours."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return None
    custom = os.environ.get(TOKEN_PATH_ENV)
    path = Path(custom).expanduser() if custom else default_token_path()
    if not path.is_file():
        return None
    if not custom:  # Ray's own folder; a folder the user chose is left as it is
        path.parent.chmod(0o700)
    path.chmod(0o600)
    return path


def find_token() -> str | None:
    """The Ray auth token, in Ray's own order: ``$RAY_AUTH_TOKEN``, the file at
    ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``. Returns None when there is none, or when
    ``RAY_AUTH_MODE=disabled``."""
    if os.environ.get(AUTH_MODE_ENV, "").lower() == "disabled":
        return None
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    path = (
        Path(os.environ[TOKEN_PATH_ENV]).expanduser()
        if os.environ.get(TOKEN_PATH_ENV)
        else default_token_path()
    )
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def auth_headers() -> dict[str, str]:
    """``{"Authorization": "Bearer TOKEN"}`` when a token is found, else ``{}``."""
    token = find_token()
    return {"Authorization": f"Bearer {token}"} if token else {}
