"""The local Ray instance ``kiln serve start`` starts when no cluster is given, and the state file
that lets ``kiln serve status`` and ``kiln serve stop`` find it again
(``RUN_DIR/serve/state.json``).

Starting and stopping the instance is the job of ``kiln.local_ray`` (the one manager of the Ray
heads Kiln starts): ``ray start --head --block`` in its own session, with its own temp dir and free
ports, so it neither collides with other Ray instances on the machine nor becomes the one a bare
``ray.init()`` connects to; ``stop`` stops that session's processes only, after checking the
recorded leader's identity (pid and start time).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.files import atomic_write_json
from kiln.local_ray import (
    RayHead,
    free_port,
    free_port_block,
    head_environment,
    start_head,
)

STATE_FILE = "state.json"
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-node mode, on loopback

__all__ = [
    "LocalRay",
    "ServeState",
    "clear_state",
    "free_port",
    "free_port_block",
    "load_state",
    "local_ray_from",
    "save_state",
    "start_local_ray",
    "state_dir",
]


@dataclass
class LocalRay:
    """A ``ray start --block`` process Kiln started (pid = its session), as the state file keeps
    it."""

    pid: int
    address: str
    temp_dir: str
    log: str
    metrics_port: int
    dashboard_port: int
    auth_mode: str
    started: int | None = None  # the leader's start time (clock ticks); None in older state files
    dashboard_url: str | None = None
    console_url: str | None = None  # the Kiln console (``/console/``), when served with one

    def __post_init__(self) -> None:
        if self.dashboard_url is None:  # older state files: the dashboard listens on 127.0.0.1
            self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    def head(self) -> RayHead:
        return RayHead(
            pid=self.pid,
            started=self.started,
            gcs_address=self.address,
            dashboard_url=self.dashboard_url or "",
            temp_dir=self.temp_dir,
            log_file=self.log,
            metrics_port=self.metrics_port,
        )

    def alive(self) -> bool:
        """Whether the instance's leader still runs (never true of a process that reused its
        pid)."""
        return self.head().is_running()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the instance's processes (its session only) and remove its temp dir."""
        self.head().stop(timeout=timeout)


def local_head_env(secrets: Iterable[str] = ()) -> dict[str, str]:
    """The environment of the local serving head: ``head_environment`` with Kiln's settings, and
    without the variables named in ``secrets`` (the API key's: every Ray process inherits the
    head's environment, and replicas get only the key's sha256)."""
    env = head_environment(
        {
            "RAY_USAGE_STATS_ENABLED": "0",
            # Serve is shut down before the instance stops; waiting for node draining would only
            # add 30 s.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            # Ray's single-machine mode (its default on macOS): the node's address is 127.0.0.1,
            # not the machine's outside address, so the agents, the Ray client server and the
            # metrics exporter listen on loopback. The instance takes no other nodes.
            LOCAL_ONLY_ENV: "0",
        }
    )
    for name in secrets:
        env.pop(name, None)
    return env


def start_local_ray(
    log_dir: Path,
    num_cpus: float | None = None,
    timeout: float = 120.0,
    secrets: Iterable[str] = (),
) -> LocalRay:
    """Start a detached single-node Ray head bound to 127.0.0.1, its output in ``log_dir/ray.log``,
    its environment without the variables named in ``secrets``. Returns it. Raises KilnError if it
    does not come up (nothing of it is left running then)."""
    env = local_head_env(secrets)
    log_path = log_dir / "ray.log"
    try:
        head = start_head(
            "kiln-serve-",
            log_file=log_path,
            node_ip_address="127.0.0.1",
            num_cpus=num_cpus,
            metrics_port=True,
            extra_args=["--disable-usage-stats"],
            env=env,
            timeout=timeout,
        )
    except KilnError as exc:
        raise KilnError(f"the local Ray instance did not start ({exc})") from None
    return LocalRay(
        pid=head.pid,
        # Ray records the machine's outside address for a node started on 127.0.0.1; the instance
        # serves this machine only, so clients reach its GCS on loopback.
        address=f"127.0.0.1:{head.gcs_address.rsplit(':', 1)[1]}",
        temp_dir=head.temp_dir,
        log=head.log_file,
        metrics_port=head.metrics_port or 0,
        dashboard_port=int(head.dashboard_url.rsplit(":", 1)[1]),
        auth_mode="token",
        started=head.started,
        dashboard_url=head.dashboard_url,
    )


@dataclass
class ServeState:
    """What ``kiln serve start`` left running (``run_dir/serve/state.json``)."""

    address: str
    url: str
    ingress: str
    models: list[dict[str, Any]] = field(default_factory=list)
    metrics_url: str | None = None
    local_ray: dict[str, Any] | None = None  # a LocalRay's fields when Kiln started the instance
    started_at: float = 0.0
    haproxy_dir: str | None = None  # HAProxy's files (ingress 'haproxy')
    # the registry the served versions come from (rollouts load from it)
    tracking_uri: str | None = None
    # The serving cluster's dashboard (Jobs API), captured at start: the local instance's, else
    # what the caller recorded (ray_connection.connected_dashboard_url()); None when unknown.
    dashboard_url: str | None = None
    console_url: str | None = None  # the Kiln console (``/console/``), when served with one
    grpc_url: str | None = None  # the OIP gRPC service (host:port), when served

    def __post_init__(self) -> None:
        local = self.local()
        if self.dashboard_url is None and local is not None:
            self.dashboard_url = local.dashboard_url

    def local(self) -> LocalRay | None:
        return LocalRay(**self.local_ray) if self.local_ray else None


def state_dir(run_dir: str | Path) -> Path:
    """``RUN_DIR/serve``: where the state file and the local instance's log live."""
    return Path(run_dir).expanduser().resolve() / "serve"


def load_state(run_dir: str | Path) -> ServeState | None:
    """The state ``kiln serve start`` saved in ``run_dir``, or None when there is none (or it is
    unreadable)."""
    path = state_dir(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return ServeState(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError):
        return None


def save_state(run_dir: str | Path, state: ServeState) -> Path:
    """Write the state file atomically (a reader never sees half of it). Returns its path."""
    return atomic_write_json(state_dir(run_dir) / STATE_FILE, asdict(state))


def clear_state(run_dir: str | Path) -> None:
    """Remove the state file (nothing is served from ``run_dir`` any more)."""
    (state_dir(run_dir) / STATE_FILE).unlink(missing_ok=True)


def local_ray_from(local: LocalRay) -> dict[str, Any]:
    """A LocalRay as the state file keeps it."""
    return asdict(local)
