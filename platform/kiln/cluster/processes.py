"""Processes Kiln starts and stops itself: free ports, and stopping one process session by its
recorded id.

Several people may run Ray on one machine, so Kiln never stops Ray by name (no ``ray stop``): it
starts a server in a new session (``start_new_session=True``), records the leader's pid, and later
stops exactly the processes of that session.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, session, ...), or
    None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot): tells a process from a later one that reused
    its pid."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def is_running(pid: int, started: int | None = None) -> bool:
    """True when ``pid`` is a live process (not a zombie) and, if given, started at ``started``."""
    fields = _stat(pid)
    if not fields or fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and int(fields[3]) == sid and fields[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def stop_session(leader: int, started: int | None, timeout: float = 45.0) -> list[int]:
    """SIGTERM the session leader ``leader`` (started by Kiln with a new session), wait up to
    ``timeout`` seconds for its session to exit, then SIGKILL what is left of that session. Returns
    the killed pids.

    Nothing happens when ``leader`` now names another process (``started`` differs).
    """
    if is_running(leader, started):
        os.kill(leader, signal.SIGTERM)
    elif start_ticks(leader) is not None:
        # The pid now names another process. Linux reuses no pid still in use as a session id,
        # so our session has no members left: nothing of ours to stop.
        return []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and session_members(leader):
        time.sleep(0.5)
    left = session_members(leader)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left
