"""The one manager of the Ray heads Kiln starts on this machine (``kiln serve start`` without
``--address``, and ``kiln cluster start``), and of the process sessions they run in.

A head is ``ray start --head --block`` started in a new process session: it outlives the CLI call,
and every process Ray starts for it (GCS, raylet, dashboard, workers) belongs to that session. Kiln
records the leader's pid *and its start time* (clock ticks since boot): a pid is reused once its
process is gone, and the start time tells the recorded process from a later one with its pid.

Several people may run Ray on one machine, so Kiln never stops Ray by name (no ``ray stop``, which
stops every Ray on the machine): ``stop_session`` stops exactly the processes of the recorded
session and verifies each one's identity (session and start time) right before signalling it,
through a pid file descriptor where the kernel has them, so a process that merely reuses a pid is
never signalled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError
from kiln.ray_connection import (
    AUTH_MODE_ENV,
    LOCAL_WORKER_ENV,
    find_token,
    secure_token_file,
    token_source,
)
from kiln.waiting import WaitTimeout, wait_until

# Only pids and ports: nothing here imports ray, so ``kiln cluster stop`` and the CLI stay fast.

ADDRESS_FILE = "ray_current_cluster"  # ``ray start`` writes the GCS address there, as its last step


# ---- ports ---------------------------------------------------------------------------------------


# Ports Kiln picks for its listeners come from below the kernel's ephemeral range: a port picked
# there (``bind(("", 0))``) can be taken by any outgoing connection, or handed out again by the
# kernel to another process's pick, between the pick and the listener's bind (seen in CI: HAProxy's
# frontend "Address already in use"). Above Ray's default worker ports (10002-19999).
PICKED_PORTS_LOW = 20000
_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_picked: set[int] = set()  # the ports this process handed out: never twice


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections (Linux's default where unreadable)."""
    try:
        low, high = (int(x) for x in _EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, picked at random below the kernel's ephemeral range
    and never handed out twice by this process (the OS's pick where that range leaves no room)."""
    low, high = PICKED_PORTS_LOW, ephemeral_ports()[0]
    rng = random.SystemRandom()
    for _ in range(200 if high - low > 1000 else 0):
        port = rng.randrange(low, high)
        if port not in _picked and not port_in_use(port, host):
            _picked.add(port)
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        picked: int = s.getsockname()[1]
    _picked.add(picked)
    return picked


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` on ``host`` cannot be bound (something listens there, or holds it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port_block(size: int, low: int | None = None, high: int = 65536) -> int:
    """First port of ``size`` consecutive free ports in [low, high) (for Serve's per-replica port
    ranges), by default above the kernel's ephemeral range, apart from this process's other picks.
    Raises KilnError when 200 random tries find none."""
    if low is None:
        low = ephemeral_ports()[1] + 1
        if high - low < 4 * size:  # no room above it: anywhere above Ray's worker ports
            low, high = PICKED_PORTS_LOW, 60000
    rng = random.Random()
    for _ in range(200):
        start = rng.randrange(low, high - size)
        block = range(start, start + size)
        if not _picked.intersection(block) and not any(port_in_use(p, "0.0.0.0") for p in block):
            _picked.update(block)
            return start
    raise KilnError(f"no {size} consecutive free ports found between {low} and {high}")


# ---- process identity ----------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, session, ...), or None
    when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None when there is no such process: tells
    a process from a later one that reused its pid."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def is_running(pid: int, started: int | None = None) -> bool:
    """True when ``pid`` is a live process (not a zombie) and, if given, started at ``started``."""
    fields = _stat(pid)
    if not fields or fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


def is_ray_start(pid: int) -> bool:
    """Whether ``pid`` is a live ``ray start`` process: the identity check for a head recorded
    without its start time (state files written before Kiln recorded it)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"ray" in cmdline and b" start" in cmdline and is_running(pid)


def _live_members(sid: int) -> list[tuple[int, int]]:
    """(pid, start ticks) of the live processes of session ``sid`` (zombies have exited: only their
    parent has not reaped them yet)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and int(fields[3]) == sid and fields[0] not in ("Z", "X"):
                members.append((int(entry.name), int(fields[19])))
    return members


def session_members(sid: int) -> list[int]:
    """Pids of the live processes of session ``sid``."""
    return [pid for pid, _ in _live_members(sid)]


def _signal(pid: int, started: int, sid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to ``pid`` only if it still is the process that started at ``started`` in
    session ``sid``. Returns whether it was sent.

    With a pid file descriptor the check and the signal are about one process, even if the pid is
    reused in between; without one (old kernels) the window between them is a few microseconds.
    """
    fd = None
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):  # no pidfd support: check, then signal by pid
        fd = None
    try:
        fields = _stat(pid)
        if not fields or int(fields[19]) != started or int(fields[3]) != sid:
            return False
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        if fd is not None:
            os.close(fd)


def stop_session(
    leader: int, started: int | None, timeout: float = 45.0, kill_timeout: float = 10.0
) -> list[int]:
    """Stop the process session that ``leader`` (started by Kiln in a new session) leads.

    SIGTERM the leader (or, when the leader has died, the session's remaining processes), wait up to
    ``timeout`` seconds for the session to empty, SIGKILL what is left, and wait up to
    ``kill_timeout`` seconds until those are gone too (a SIGKILLed process exits only once the
    kernel schedules it: ``stop`` returns when the processes have stopped, not when the signal was
    sent). Returns the pids that had to be killed.

    ``started`` is the leader's recorded start time; nothing happens when ``leader`` now names
    another process. None means the caller has checked the leader's identity itself.
    """
    fields = _stat(leader)
    if fields is not None and started is not None and int(fields[19]) != started:
        # The pid now names another process. Linux reuses no pid that is still the id of a session
        # with members, so our session has no members left: nothing of ours to stop.
        return []
    if fields is not None and fields[0] not in ("Z", "X"):
        _signal(leader, int(fields[19]), leader, signal.SIGTERM)
    else:  # the leader died: ask the processes it left behind to stop
        for pid, ticks in _live_members(leader):
            _signal(pid, ticks, leader, signal.SIGTERM)
    try:
        wait_until(
            lambda: not _live_members(leader),
            timeout,
            f"session {leader} to exit",
            max_interval=0.5,
        )
        return []
    except WaitTimeout:
        pass
    left = [(pid, ticks) for pid, ticks in _live_members(leader)]
    killed = [pid for pid, ticks in left if _signal(pid, ticks, leader, signal.SIGKILL)]
    try:
        wait_until(
            lambda: not any(is_running(pid, ticks) for pid, ticks in left),
            kill_timeout,
            f"the killed processes of session {leader} to exit",
        )
    except WaitTimeout:
        pass  # a process stuck in the kernel (state D) dies when it leaves it; nothing more to do
    return killed


# ---- Ray heads -----------------------------------------------------------------------------------


def ray_cli() -> list[str]:
    """The ``ray`` command of the Python running Kiln (so the head runs the same Ray as the
    client)."""
    beside = Path(sys.executable).parent / "ray"
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "ray.scripts.scripts"]


def ensure_auth_token() -> str:
    """Where the Ray auth token for a head is (see ``ray_connection.find_token``); generated with
    ``ray get-auth-token --generate`` when there is none. Raises KilnError when that fails."""
    if find_token():
        secure_token_file()  # one left world-readable by an earlier Ray is fixed when Kiln uses it
        return token_source()
    proc = subprocess.run(
        [*ray_cli(), "get-auth-token", "--generate"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != AUTH_MODE_ENV},
        timeout=60,
        check=False,
    )
    if proc.returncode != 0 or not find_token():
        said = (proc.stderr or proc.stdout).strip().splitlines()
        raise KilnError(
            f"cannot create a Ray auth token with 'ray get-auth-token --generate'"
            f"{': ' + said[-1] if said else ''}"
        )
    secure_token_file()
    return token_source()


def head_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A head's environment: token auth on, no RAY_ADDRESS (the head is a cluster of its own), this
    Python's bin folder first on PATH (so that a job entrypoint's ``python`` is the one that has Ray
    and Kiln; a bare ``python`` may be another one), its workers at normal priority
    (``LOCAL_WORKER_ENV``, inherited from the raylet), then ``extra``."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env[AUTH_MODE_ENV] = "token"
    env.update(LOCAL_WORKER_ENV)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


@dataclass
class RayHead:
    """A ``ray start --head --block`` process Kiln started: the leader of the session that holds
    every process of the head."""

    pid: int
    started: int | None  # the leader's start time (clock ticks); None in old state files
    gcs_address: str  # what ``ray.init(address=...)`` and ``ray start --address`` take
    dashboard_url: str  # dashboard and Jobs API, http://127.0.0.1:PORT
    temp_dir: str
    log_file: str
    metrics_port: int | None = None

    def is_running(self) -> bool:
        """Whether the recorded leader still runs (never true of a process that reused its pid)."""
        if self.started is None:
            return is_ray_start(self.pid)
        return is_running(self.pid, self.started)

    def stop(self, timeout: float = 45.0) -> list[int]:
        """Stop every process of the head's session (see ``stop_session``) and remove its temp dir.
        Returns the pids that had to be killed."""
        started = self.started
        if started is None and not self.is_running():
            killed: list[int] = []  # unverifiable: never signal what may be another process
        else:
            killed = stop_session(self.pid, started, timeout=timeout)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return killed


def start_head(
    temp_prefix: str,
    log_file: Path | None = None,
    dashboard_port: int = 0,
    node_ip_address: str | None = None,
    num_cpus: float | None = None,
    num_gpus: int | None = None,
    resources: dict[str, float] | None = None,
    metrics_port: bool = False,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    ready: Callable[[RayHead], bool] | None = None,
    timeout: float = 120.0,
) -> RayHead:
    """Start ``ray start --head --block`` in a new session, with token authentication, its own temp
    dir (``/tmp/<temp_prefix>XXXX``) and free ports (``dashboard_port`` 0: a free one too), and the
    dashboard on 127.0.0.1; wait until it is up: ``ray start`` has written the GCS address (its last
    step) and ``ready(head)``, if given, is true.

    ``log_file``: where ``ray start``'s output goes (default: TEMP_DIR/ray-start.log). ``env``:
    the head's environment (default ``head_environment()``). Returns the head. Raises KilnError when
    the token cannot be created or the head does not come up (its processes are then stopped and
    its temp dir removed).
    """
    ensure_auth_token()
    dashboard_port = dashboard_port or free_port()
    # Short: Ray's socket paths under the temp dir must fit 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix=temp_prefix, dir="/tmp")
    log_path = log_file or Path(temp_dir) / "ray-start.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    metrics = free_port() if metrics_port else None
    cmd = [
        *ray_cli(),
        "start",
        "--head",
        "--block",
        "--port",
        str(free_port()),
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard_port),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--ray-client-server-port",
        str(free_port()),
        "--temp-dir",
        temp_dir,
    ]
    if metrics is not None:
        cmd += ["--metrics-export-port", str(metrics)]
    if node_ip_address:
        cmd += ["--node-ip-address", node_ip_address]
    if num_cpus is not None:
        cmd += ["--num-cpus", f"{num_cpus:g}"]
    if num_gpus is not None:
        cmd += ["--num-gpus", str(num_gpus)]
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    cmd += extra_args or []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=head_environment() if env is None else env,
            start_new_session=True,
        )
    head = RayHead(
        pid=proc.pid,
        started=start_ticks(proc.pid),
        gcs_address="",
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        temp_dir=temp_dir,
        log_file=str(log_path),
        metrics_port=metrics,
    )
    address_file = Path(temp_dir) / ADDRESS_FILE

    def up() -> bool:
        if proc.poll() is not None:
            raise KilnError(
                f"ray start exited with code {proc.returncode}: {last_log_line(log_path)} "
                f"(log: {log_path})"
            )
        address = address_file.read_text().strip() if address_file.is_file() else ""
        if not address:
            return False
        head.gcs_address = address
        return ready is None or ready(head)

    try:
        wait_until(up, timeout, "the Ray head", interval=0.3, max_interval=1.0)
    except WaitTimeout:
        head.stop(timeout=20)
        proc.wait(timeout=5)
        raise KilnError(
            f"the Ray head did not come up at {head.dashboard_url} within {timeout:g}s "
            f"(log: {log_path})"
        ) from None
    except BaseException:
        head.stop(timeout=20)
        proc.wait(timeout=5)
        raise
    return head


def last_log_line(path: str | Path) -> str:
    """The most telling line of a log: its last line naming an error, else its last line."""
    try:
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines()]
    except OSError:
        return "no log"
    lines = [line for line in lines if line]
    errors = [line for line in lines if "rror" in line]
    return (errors or lines or ["no output"])[-1][:300]
