"""An MLflow tracking server for jobs on a cluster: ``kiln tracking serve``.

Workers on other machines cannot write the submitter's sqlite file, so a cluster's runs go to one
``mlflow server``: a sqlite store in ``store_dir``, and artifacts proxied by the server
(``--serve-artifacts`` into ``store_dir/artifacts``), so neither workers nor clients need a shared
disk. Jobs get its URI through ``kiln submit --tracking-uri`` (MLFLOW_TRACKING_URI in the job's
runtime env).
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError
from kiln.local_ray import port_in_use


@dataclass
class TrackingServer:
    host: str
    port: int
    store_dir: Path
    workers: int = 1

    @property
    def uri(self) -> str:
        """The tracking URI clients and jobs use."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def backend_store_uri(self) -> str:
        return f"sqlite:///{self.store_dir / 'mlflow.db'}"

    @property
    def artifacts_dir(self) -> Path:
        return self.store_dir / "artifacts"

    def command(self) -> list[str]:
        """The ``mlflow server`` command line (run with this Python, so it is the MLflow Kiln
        uses)."""
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_store_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.artifacts_dir),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tracking_server(
    host: str = "127.0.0.1",
    port: int = 5000,
    store_dir: str | Path = "runs/tracking",
    workers: int = 1,
) -> TrackingServer:
    """Check the port and create the store folder. Raises KilnError when the port is taken."""
    if not 0 < port < 65536:
        raise KilnError(f"--port {port}: not a TCP port")
    bind_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    if port_in_use(port, "0.0.0.0" if host in ("0.0.0.0", "::") else bind_host):
        raise KilnError(f"port {port} on {host} is in use; pass another --port")
    server = TrackingServer(
        host=host, port=port, store_dir=Path(store_dir).expanduser().resolve(), workers=workers
    )
    server.artifacts_dir.mkdir(parents=True, exist_ok=True)
    return server


def exec_server(server: TrackingServer) -> None:
    """Replace this process with ``mlflow server`` (signals such as Ctrl-C then reach MLflow
    itself)."""
    sys.stdout.flush()
    sys.stderr.flush()
    cmd = server.command()
    os.execve(cmd[0], cmd, server_environment())


def server_environment() -> dict[str, str]:
    """The environment ``mlflow server`` runs with: this process's, and MLflow's job runner off
    unless the user set it (GenAI scorer jobs: about eight extra processes that serve nothing Kiln
    uses)."""
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
