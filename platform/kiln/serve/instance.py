"""The local Ray instance ``kiln serve start`` starts when no cluster is given, and the state file
that lets ``kiln serve status`` and ``kiln serve stop`` find it again.

The instance is ``ray start --head --block`` in its own session (process group), so it outlives the
CLI call; ``stop`` sends it SIGTERM (Ray then stops the processes it started) and, if it lingers,
SIGKILLs that process group only. It gets its own temp dir and free ports, so it neither collides
with other Ray instances on the machine nor becomes the one a bare ``ray.init()`` connects to.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

STATE_FILE = "state.json"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_block(size: int, low: int = 20000, high: int = 60000) -> int:
    """First port of ``size`` consecutive free ports in [low, high) (for Serve's per-replica port
    ranges)."""
    import random

    rng = random.Random()
    for _ in range(200):
        start = rng.randrange(low, high - size)
        if all(_port_free(p) for p in range(start, start + size)):
            return start
    raise KilnError(f"no {size} consecutive free ports found between {low} and {high}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@dataclass
class LocalRay:
    """A ``ray start --block`` process Kiln started (pid = its process group)."""

    pid: int
    address: str
    temp_dir: str
    log: str
    metrics_port: int
    dashboard_port: int
    auth_mode: str

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return _is_ray_start(self.pid)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, wait, then SIGKILL what is left of its process group; remove its temp dir."""
        if self.alive():  # only a pid that is still our `ray start`: never signal a recycled pid
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            try:
                os.killpg(
                    self.pid, signal.SIGKILL
                )  # stragglers of this instance only: its own session
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _is_ray_start(pid: int) -> bool:
    """Guard against a recycled pid: the process must still be a ``ray start``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return True  # no /proc: trust the pid
    if b"ray" not in cmdline or b"start" not in cmdline:
        return False
    try:  # a zombie has exited; only its parent has not reaped it yet
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def ensure_auth_token() -> None:
    """Token authentication needs ~/.ray/auth_token; create it the way Ray's CLI does if it is
    missing."""
    if (Path.home() / ".ray" / "auth_token").is_file():
        return
    subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
        capture_output=True,
        timeout=60,
        check=False,
    )


def start_local_ray(
    log_dir: Path, num_cpus: float | None = None, timeout: float = 120.0
) -> LocalRay:
    """Start a detached single-node Ray head bound to this machine. Raises KilnError if it does not
    come up."""
    ensure_auth_token()
    ports = {name: free_port() for name in ("gcs", "dashboard", "agent", "metrics", "client")}
    temp_dir = tempfile.mkdtemp(
        prefix="kiln-serve-", dir="/tmp"
    )  # short: Ray's socket paths must fit 107 bytes
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "ray.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_USAGE_STATS_ENABLED="0",
        # Serve is shut down before the instance stops; waiting for node draining would only add 30
        # s.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    cmd = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(ports["gcs"]),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(ports["dashboard"]),
        "--dashboard-agent-listen-port",
        str(ports["agent"]),
        "--metrics-export-port",
        str(ports["metrics"]),
        "--ray-client-server-port",
        str(ports["client"]),
        "--temp-dir",
        temp_dir,
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        cmd += ["--num-cpus", f"{num_cpus:g}"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    local = LocalRay(
        pid=proc.pid,
        address=f"127.0.0.1:{ports['gcs']}",
        temp_dir=temp_dir,
        log=str(log_path),
        metrics_port=ports["metrics"],
        dashboard_port=ports["dashboard"],
        auth_mode="token",
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise KilnError(
                f"the local Ray instance exited at start ({_last_line(log_path)}); log: {log_path}"
            )
        if "Ray runtime started" in log_path.read_text(errors="replace"):
            return local
        time.sleep(0.3)
    local.stop()
    raise KilnError(f"the local Ray instance did not start within {timeout:g}s; log: {log_path}")


def _last_line(path: Path) -> str:
    lines = [l.strip() for l in path.read_text(errors="replace").splitlines() if l.strip()]
    errors = [l for l in lines if "rror" in l]
    return (errors or lines or ["no output"])[-1][:300]


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
    tracking_uri: str | None = (
        None  # the registry the served versions come from (rollouts load from it)
    )

    def local(self) -> LocalRay | None:
        return LocalRay(**self.local_ray) if self.local_ray else None


def state_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).expanduser().resolve() / "serve"


def load_state(run_dir: str | Path) -> ServeState | None:
    path = state_dir(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return ServeState(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError):
        return None


def save_state(run_dir: str | Path, state: ServeState) -> Path:
    path = state_dir(run_dir) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def clear_state(run_dir: str | Path) -> None:
    (state_dir(run_dir) / STATE_FILE).unlink(missing_ok=True)


def local_ray_from(local: LocalRay) -> dict[str, Any]:
    return asdict(local)
