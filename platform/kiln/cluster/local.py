"""A local Ray head for people without a cluster: ``kiln cluster start | stop | status``.

``start`` runs ``ray start --head --block`` in a new process session, with the dashboard and Jobs
API on
127.0.0.1 and Ray's token authentication on (``RAY_AUTH_MODE=token``). Its pid, ports and temp dir
go to a small state file (``$KILN_HOME/cluster.json``, default ``~/.kiln``), so ``stop`` stops
exactly the processes ``start`` started and nothing else: never a bare ``ray stop``, which would
stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.cluster import processes
from kiln.cluster.auth import AUTH_MODE_ENV, auth_headers, find_token, token_source
from kiln.errors import KilnError

DEFAULT_DASHBOARD_PORT = 8265


@dataclass
class LocalCluster:
    """A head started by ``kiln cluster start``, as recorded in the state file."""

    pid: int  # the ``ray start --block`` process: leader of the session holding every process of the head
    started: int  # its start time (clock ticks), so that a reused pid is never taken for it
    dashboard_url: str  # Jobs API and dashboard: what ``kiln submit --address`` takes
    gcs_address: str  # what ``ray start --address`` takes to add a node
    temp_dir: str
    log_file: str
    created_at: float = field(default_factory=time.time)

    def is_running(self) -> bool:
        return processes.is_running(self.pid, self.started)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NodeInfo:
    node_id: str
    node_ip: str
    alive: bool
    is_head: bool
    resources: dict[str, float]


@dataclass
class ClusterStatus:
    """``kiln cluster status``: whether the recorded head runs, and the nodes the cluster has."""

    running: bool
    cluster: LocalCluster | None
    ray_version: str | None = None
    nodes: list[NodeInfo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "running": self.running,
            **(self.cluster.to_dict() if self.cluster else {}),
            "ray_version": self.ray_version,
            "nodes": [asdict(n) for n in self.nodes],
        }


def kiln_home() -> Path:
    return Path(os.environ.get("KILN_HOME") or Path.home() / ".kiln").expanduser()


def state_path() -> Path:
    return kiln_home() / "cluster.json"


def read_state() -> LocalCluster | None:
    """The recorded head, or None when ``kiln cluster start`` has not run (or the file is
    unreadable)."""
    try:
        return LocalCluster(**json.loads(state_path().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_state(cluster: LocalCluster) -> None:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cluster.to_dict(), indent=2))
    tmp.replace(path)  # atomic: a reader sees the old state or the new one, never half


def ray_cli() -> list[str]:
    """The ``ray`` command of the Python running Kiln (so the head runs the same Ray as the
    client)."""
    beside = Path(sys.executable).parent / "ray"
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "ray.scripts.scripts"]


def head_environment() -> dict[str, str]:
    """The head's environment: token auth on, and this Python's bin folder first on PATH so that a
    job entrypoint's ``python`` is the one that has Ray and Kiln (a bare ``python`` may be another
    one)."""
    env = dict(os.environ)
    env[AUTH_MODE_ENV] = "token"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("RAY_ADDRESS", None)
    return env


def ensure_token() -> str:
    """The Ray auth token for the head; generated with ``ray get-auth-token --generate`` when there
    is none."""
    if find_token():
        return token_source()
    proc = subprocess.run(
        [*ray_cli(), "get-auth-token", "--generate"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != AUTH_MODE_ENV},
        timeout=60,
    )
    if proc.returncode != 0 or not find_token():
        said = (proc.stderr or proc.stdout).strip().splitlines()
        raise KilnError(
            f"cannot create a Ray auth token with 'ray get-auth-token --generate'"
            f"{': ' + said[-1] if said else ''}"
        )
    return token_source()


def start_local_cluster(
    num_cpus: float | None = None,
    num_gpus: int | None = None,
    resources: dict[str, float] | None = None,
    dashboard_port: int = DEFAULT_DASHBOARD_PORT,
    node_ip_address: str | None = None,
    timeout: float = 120.0,
) -> LocalCluster:
    """Start a Ray head on this machine and wait until its Jobs API answers. Returns the recorded
    head.

    Raises KilnError when one is already running, when the dashboard port is taken, or when Ray does
    not come up (the head's processes are then stopped again).
    """
    current = read_state()
    if current and current.is_running():
        raise KilnError(
            f"a Kiln cluster is already running (pid {current.pid}, {current.dashboard_url}); "
            "stop it with 'kiln cluster stop'"
        )
    dashboard_port = dashboard_port or processes.free_port()
    if processes.port_in_use(dashboard_port):
        raise KilnError(
            f"port {dashboard_port} is in use (another Ray dashboard?); pass --dashboard-port N, "
            "or 0 for a free port"
        )
    ensure_token()
    temp_dir = tempfile.mkdtemp(
        prefix="kiln-ray-", dir="/tmp"
    )  # short: Ray's socket paths must stay < 108 chars
    log_file = Path(temp_dir) / "ray-start.log"
    cmd = [
        *ray_cli(),
        "start",
        "--head",
        "--block",
        "--port",
        str(processes.free_port()),
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard_port),
        "--ray-client-server-port",
        str(processes.free_port()),
        "--dashboard-agent-listen-port",
        str(processes.free_port()),
        "--temp-dir",
        temp_dir,
    ]
    if node_ip_address:
        cmd += ["--node-ip-address", node_ip_address]
    if num_cpus is not None:
        cmd += ["--num-cpus", f"{num_cpus:g}"]
    if num_gpus is not None:
        cmd += ["--num-gpus", str(num_gpus)]
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=head_environment(),
            start_new_session=True,
        )
    started = processes.start_ticks(proc.pid) or 0
    cluster = LocalCluster(
        pid=proc.pid,
        started=started,
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        gcs_address="",
        temp_dir=temp_dir,
        log_file=str(log_file),
    )
    try:
        cluster.gcs_address = _wait_until_up(cluster, proc, timeout)
    except BaseException:
        processes.stop_session(proc.pid, started, timeout=20)
        proc.wait(timeout=5)
        raise
    _write_state(cluster)
    return cluster


def _wait_until_up(cluster: LocalCluster, proc: subprocess.Popen, timeout: float) -> str:
    """Wait until the Jobs API answers and ``ray start`` has written the head's GCS address
    (TEMP_DIR/ray_current_cluster, its last step). Returns that address."""
    import requests

    address_file = Path(cluster.temp_dir) / "ray_current_cluster"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise KilnError(
                f"ray start exited with code {proc.returncode}: {_last_line(cluster.log_file)} "
                f"(log: {cluster.log_file})"
            )
        try:
            answered = (
                requests.get(
                    f"{cluster.dashboard_url}/api/jobs/", headers=auth_headers(), timeout=2
                ).status_code
                == 200
            )
        except requests.RequestException:
            answered = False
        address = address_file.read_text().strip() if address_file.is_file() else ""
        if answered and address:
            return address
        time.sleep(0.5)
    raise KilnError(
        f"the Ray head did not come up at {cluster.dashboard_url} within {timeout:g}s "
        f"(log: {cluster.log_file})"
    )


def _last_line(path: str) -> str:
    try:
        lines = [
            l.strip() for l in Path(path).read_text(errors="replace").splitlines() if l.strip()
        ]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


def stop_local_cluster(timeout: float = 45.0) -> LocalCluster | None:
    """Stop the head ``kiln cluster start`` started (its session only) and forget it. Returns it, or
    None when there was none. Nodes added to it with ``ray start --address`` are not touched."""
    cluster = read_state()
    if cluster is None:
        return None
    processes.stop_session(cluster.pid, cluster.started, timeout=timeout)
    state_path().unlink(missing_ok=True)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    return cluster


def cluster_nodes(address: str, headers: dict[str, str] | None = None) -> list[NodeInfo]:
    """The cluster's nodes, from Ray's state API over the dashboard (``headers``: default, the found
    token)."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(address=address, headers=auth_headers() if headers is None else headers)
    nodes = client.list(
        StateResource.NODES, options=ListApiOptions(detail=True), raise_on_missing_output=False
    )
    return [
        NodeInfo(
            node_id=n.node_id,
            node_ip=n.node_ip,
            alive=n.state == "ALIVE",
            is_head=bool(n.is_head_node),
            resources={k: float(v) for k, v in (n.resources_total or {}).items()},
        )
        for n in nodes
    ]


def local_cluster_status() -> ClusterStatus:
    """Whether the recorded head runs; when it does, its Ray version and nodes."""
    cluster = read_state()
    if cluster is None or not cluster.is_running():
        return ClusterStatus(running=False, cluster=cluster)
    import requests

    try:
        version = requests.get(
            f"{cluster.dashboard_url}/api/version", headers=auth_headers(), timeout=5
        ).json()
        nodes = cluster_nodes(cluster.dashboard_url)
    except Exception as exc:  # noqa: BLE001  (the process runs but does not answer: say so)
        raise KilnError(
            f"the head (pid {cluster.pid}) runs but {cluster.dashboard_url} does not answer "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    return ClusterStatus(
        running=True, cluster=cluster, ray_version=version.get("ray_version"), nodes=nodes
    )
