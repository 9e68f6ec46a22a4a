"""What the HAProxy ingress saw of a model: its retries, redispatches and requests, read from
HAProxy's own statistics (``show stat`` on the admin socket Serve gives each node's HAProxy under
the instance's HAProxy folder, ``RUN_DIR/serve/state.json``'s ``haproxy_dir``).

The counters are HAProxy's, per backend (one per model application and protocol). A reload
(Serve rewrites HAProxy's config whenever a replica comes or goes) starts a new process whose
counters start at zero: ``IngressCounters.since`` treats a counter that went down as a restart.
"""

from __future__ import annotations

import csv
import io
import socket
from dataclasses import astuple, dataclass
from pathlib import Path

from kiln.compat import KILN_MODEL_APP_PREFIX

# Serve's HAProxy names a backend after its application, one per protocol (Ray 2.60's template)
BACKEND_PREFIXES = ("http-", "grpc-")
SOCKET_TIMEOUT_S = 1.0
MAX_STAT_BYTES = 4 << 20  # one backend and server per replica: far below this


@dataclass(frozen=True)
class IngressCounters:
    """Cumulative counts of one model's backends since HAProxy's process started."""

    requests: int = 0  # sessions the backends took (HAProxy's ``stot``)
    retries: int = 0  # connection attempts made again (``wretr``)
    redispatches: int = 0  # requests sent again to another replica (``wredis``)
    errors_5xx: int = 0  # 5xx answers, the ingress's own included (``hrsp_5xx``)

    def __add__(self, other: IngressCounters) -> IngressCounters:
        return IngressCounters(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def since(self, earlier: IngressCounters | None) -> IngressCounters:
        """The counts added since ``earlier``; all of them when there is no earlier reading or a
        counter went down (HAProxy reloaded: a new process counts from zero)."""
        if earlier is None:
            return self
        pairs = list(zip(astuple(self), astuple(earlier), strict=True))
        if any(now < then for now, then in pairs):
            return self
        return IngressCounters(*(now - then for now, then in pairs))


def parse_show_stat(text: str) -> dict[str, IngressCounters]:
    """HAProxy's ``show stat`` CSV -> counters per backend (its ``BACKEND`` rows)."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    rows = csv.DictReader(io.StringIO("\n".join([lines[0][2:], *lines[1:]])))
    found: dict[str, IngressCounters] = {}
    for row in rows:
        if row.get("svname") != "BACKEND" or not row.get("pxname"):
            continue
        found[row["pxname"]] = IngressCounters(
            requests=_count(row.get("stot")),
            retries=_count(row.get("wretr")),
            redispatches=_count(row.get("wredis")),
            errors_5xx=_count(row.get("hrsp_5xx")),
        )
    return found


def model_counters(haproxy_dir: str | Path, model: str) -> IngressCounters | None:
    """The model's counters summed over its backends and over every HAProxy whose admin socket is
    under ``haproxy_dir`` (one per node this machine runs); None when none answers."""
    names = {f"{p}{KILN_MODEL_APP_PREFIX}{model}" for p in BACKEND_PREFIXES}
    total: IngressCounters | None = None
    for sock in sorted(Path(haproxy_dir).glob("*/admin.sock")):
        try:
            stats = parse_show_stat(_ask(sock, "show stat"))
        except OSError:
            continue  # a node's HAProxy between two processes, or gone
        for name, counters in stats.items():
            if name in names:
                total = counters if total is None else total + counters
    return total


def _ask(path: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(SOCKET_TIMEOUT_S)
        s.connect(str(path))
        s.sendall(command.encode() + b"\n")
        chunks, size = [], 0
        while size < MAX_STAT_BYTES:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks).decode(errors="replace")


def _count(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0
