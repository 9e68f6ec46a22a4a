"""A local Ray head for people without a cluster: ``kiln cluster start | stop | status``.

``start`` runs ``ray start --head --block`` in a new process session (through ``kiln.local_ray``,
the one manager of the Ray heads Kiln starts), with the dashboard and Jobs API on 127.0.0.1 and
Ray's token authentication on (``RAY_AUTH_MODE=token``). Its pid, start time, addresses and temp dir
go to a small state file (``$KILN_HOME/cluster.json``, default ``~/.kiln``), so ``stop`` stops
exactly the processes ``start`` started and nothing else: never a bare ``ray stop``, which would
stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError, first_line
from kiln.files import atomic_write_json
from kiln.local_ray import RayHead, is_running, port_in_use, start_head
from kiln.ray_connection import auth_headers

DEFAULT_DASHBOARD_PORT = 8265


@dataclass
class LocalCluster:
    """A head started by ``kiln cluster start``, as recorded in the state file."""

    # the ``ray start --block`` process: leader of the session holding every process of the head
    pid: int
    started: int  # its start time (clock ticks), so that a reused pid is never taken for it
    dashboard_url: str  # Jobs API and dashboard: what ``kiln submit --address`` takes
    gcs_address: str  # what ``ray start --address`` takes to add a node
    temp_dir: str
    log_file: str
    created_at: float = field(default_factory=time.time)

    def head(self) -> RayHead:
        return RayHead(
            pid=self.pid,
            started=self.started,
            gcs_address=self.gcs_address,
            dashboard_url=self.dashboard_url,
            temp_dir=self.temp_dir,
            log_file=self.log_file,
        )

    def is_running(self) -> bool:
        """Whether the recorded head still runs (never true of a process that reused its pid)."""
        return is_running(self.pid, self.started)

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
    # atomic: a reader sees the old state or the new one, never half
    atomic_write_json(state_path(), cluster.to_dict())


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
    if dashboard_port and port_in_use(dashboard_port):
        raise KilnError(
            f"port {dashboard_port} is in use (another Ray dashboard?); pass --dashboard-port N, "
            "or 0 for a free port"
        )
    head = start_head(
        "kiln-ray-",
        dashboard_port=dashboard_port,
        node_ip_address=node_ip_address,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        resources=resources,
        ready=_jobs_api_answers,
        timeout=timeout,
    )
    cluster = LocalCluster(
        pid=head.pid,
        started=head.started or 0,
        dashboard_url=head.dashboard_url,
        gcs_address=head.gcs_address,
        temp_dir=head.temp_dir,
        log_file=head.log_file,
    )
    try:
        _write_state(cluster)
    except BaseException:
        head.stop(timeout=20)
        raise
    return cluster


def _jobs_api_answers(head: RayHead) -> bool:
    """Whether the head's Jobs API answers (what ``kiln submit`` needs of it)."""
    import requests

    try:
        url = f"{head.dashboard_url}/api/jobs/"
        return requests.get(url, headers=auth_headers(), timeout=2).status_code == 200
    except requests.RequestException:
        return False


def stop_local_cluster(timeout: float = 45.0) -> LocalCluster | None:
    """Stop the head ``kiln cluster start`` started (its session only) and forget it. Returns it, or
    None when there was none. Nodes added to it with ``ray start --address`` are not touched."""
    cluster = read_state()
    if cluster is None:
        return None
    cluster.head().stop(timeout=timeout)
    state_path().unlink(missing_ok=True)
    return cluster


def cluster_nodes(address: str, headers: dict[str, str] | None = None) -> list[NodeInfo]:
    """The cluster's nodes, from Ray's state API over the dashboard (``headers``: default, the found
    token)."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, NodeState, StateResource

    client = StateApiClient(address=address, headers=auth_headers() if headers is None else headers)
    listed = client.list(
        StateResource.NODES, options=ListApiOptions(detail=True), raise_on_missing_output=False
    )
    nodes = [n for n in listed if isinstance(n, NodeState)]  # what a NODES listing holds
    return [
        NodeInfo(
            node_id=str(n.node_id),
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
    from ray.util.state.exception import RayStateApiException

    try:
        version = requests.get(
            f"{cluster.dashboard_url}/api/version", headers=auth_headers(), timeout=5
        ).json()
        nodes = cluster_nodes(cluster.dashboard_url)
    except (requests.RequestException, RayStateApiException, ValueError, RuntimeError) as exc:
        # the process runs but does not answer (or not as a Ray dashboard): say so
        raise KilnError(
            f"the head (pid {cluster.pid}) runs but {cluster.dashboard_url} does not answer "
            f"({first_line(exc)})"
        ) from None
    return ClusterStatus(
        running=True, cluster=cluster, ray_version=version.get("ray_version"), nodes=nodes
    )
