"""Per-version windowed request statistics: replicas count, the controller sums and evaluates.

A replica keeps one ``VersionWindow`` per version and hands it over (``drain``) every report; the
controller adds the reports of all replicas into the window of the current gate interval and turns
it into ``VersionMetrics`` when the interval ends. Errors are server faults (HTTP 5xx): a client's
bad request (4xx) says nothing about the version.

Gates see only the traffic the rollout routed (unversioned requests and the mirrored ones) and
answered without a client error: a client cannot force a rollback by sending bad requests to the
candidate, nor promote a bad candidate by pinning good traffic to it (``/versions/{v}/...``). Both
kinds are counted apart (``pinned``, ``client_errors``) and shown in the status.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_SAMPLES = 2000  # latency samples kept per version and window (a uniform reservoir beyond that)


@dataclass
class VersionWindow:
    requests: int = 0  # routed requests answered without a client error: what gates read
    errors: int = 0
    pinned: int = 0  # requests that named this version: never in gates
    client_errors: int = 0  # routed requests answered 4xx (the client's fault): never in gates
    latency_ms: list[float] = field(default_factory=list)
    seen_latencies: int = 0
    compared: int = 0  # mirrored requests whose answer was compared with the stable version's
    agreed: int = 0
    signals: dict[str, float] = field(default_factory=dict)  # quality signals (mean over replicas)
    signal_reports: int = 0
    lost: int = 0  # requests in flight in a replica that died: errors seen outside any replica

    def record_lost(self, requests: int) -> None:
        """Count requests a dead replica was answering: each is an error of this version (its
        client got an error, or the ingress retried it elsewhere)."""
        self.lost += requests
        self.requests += requests
        self.errors += requests

    def record(self, status: int, latency_ms: float, routed: bool = True) -> None:
        """Count one answered request; ``routed``: the rollout chose this version (not pinned)."""
        if not routed:
            self.pinned += 1
            return
        if 400 <= status < 500:
            self.client_errors += 1
            return
        self.requests += 1
        if status >= 500:
            self.errors += 1
        self._sample(latency_ms)

    def compare(self, agreed: int, rows: int) -> None:
        self.compared += rows
        self.agreed += agreed

    def _sample(self, value: float) -> None:
        self.seen_latencies += 1
        if len(self.latency_ms) < MAX_SAMPLES:
            self.latency_ms.append(value)
        else:
            slot = random.randrange(self.seen_latencies)
            if slot < MAX_SAMPLES:
                self.latency_ms[slot] = value

    def add(self, other: VersionWindow) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.pinned += other.pinned
        self.client_errors += other.client_errors
        self.compared += other.compared
        self.agreed += other.agreed
        self.lost += other.lost
        for value in other.latency_ms:
            self._sample(value)
        if other.signals:  # running mean over the replicas that reported the signal
            n = self.signal_reports
            for name, value in other.signals.items():
                old = self.signals.get(name)
                self.signals[name] = value if old is None else (old * n + value) / (n + 1)
            self.signal_reports += 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VersionWindow:
        return cls(**data)


@dataclass
class VersionMetrics:
    """One version over one gate interval. ``None``: no data (no requests, no comparisons)."""

    requests: int
    errors: int
    error_rate: float | None
    p50_ms: float | None
    p99_ms: float | None
    agreement: float | None
    compared: int
    signals: dict[str, float]
    pinned: int = 0  # shown, never gated
    client_errors: int = 0
    lost: int = 0  # of ``errors``: requests lost with a dead replica (counted by the controller)

    def value(self, signal: str) -> float | None:
        if signal in ("error_rate", "p50_ms", "p99_ms", "agreement"):
            return getattr(self, signal)
        return self.signals.get(signal)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def metrics_of(window: VersionWindow) -> VersionMetrics:
    return VersionMetrics(
        requests=window.requests,
        errors=window.errors,
        error_rate=window.errors / window.requests if window.requests else None,
        p50_ms=percentile(window.latency_ms, 50),
        p99_ms=percentile(window.latency_ms, 99),
        agreement=window.agreed / window.compared if window.compared else None,
        compared=window.compared,
        signals=dict(window.signals),
        pinned=window.pinned,
        client_errors=window.client_errors,
        lost=window.lost,
    )
