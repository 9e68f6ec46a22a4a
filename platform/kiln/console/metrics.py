"""Per-version time series from Ray's Prometheus endpoint: request rate, error rate, p50/p99
latency and median batch size between successive snapshots of Kiln's serving metrics
(``kiln.serve.metrics``). Pure functions over parsed snapshots, so they are tested without Ray."""

from __future__ import annotations

import math
import time
import urllib.request
from dataclasses import dataclass, field

Key = tuple[str, str]  # (model, version)
FAMILIES = {
    "ray_kiln_requests": "requests",
    "ray_kiln_request_errors": "errors",
    "ray_kiln_request_latency_ms": "latency",
    "ray_kiln_batch_size": "batch",
}


@dataclass
class VersionCounters:
    """Cumulative counters of one version, summed over replicas and endpoints."""

    requests: float = 0.0
    errors: float = 0.0
    latency_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    batch_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count


Snapshot = dict[Key, VersionCounters]


def parse_snapshot(text: str) -> Snapshot:
    """Kiln's counters per (model, version) from Prometheus text. Raises ValueError when it is not
    Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Snapshot = {}
    for family in text_string_to_metric_families(text):
        kind = FAMILIES.get(family.name)
        if kind is None:
            continue
        for s in family.samples:
            key = (s.labels.get("model", ""), s.labels.get("model_version", ""))
            c = out.setdefault(key, VersionCounters())
            if kind == "requests" and s.name.endswith("_total"):
                c.requests += s.value
            elif kind == "errors" and s.name.endswith("_total"):
                c.errors += s.value
            elif kind == "latency" and s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                c.latency_buckets[le] = c.latency_buckets.get(le, 0.0) + s.value
            elif kind == "batch" and s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                c.batch_buckets[le] = c.batch_buckets.get(le, 0.0) + s.value
    return out


def scrape(metrics_url: str, timeout: float = 3.0) -> Snapshot:
    """One snapshot of the metrics endpoint. Raises URLError/OSError when it cannot be read,
    ValueError when the answer is not Prometheus text."""
    with urllib.request.urlopen(metrics_url, timeout=timeout) as resp:
        return parse_snapshot(resp.read().decode())


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile of a cumulative histogram (Prometheus' ``histogram_quantile``: linear within
    a bucket; the highest finite bound when it falls in the +Inf bucket). None without counts."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = le, count
    return lower


def bucket_bound(q: float, buckets: dict[float, float]) -> float | None:
    """The upper bound of the bucket holding the q-quantile (batch sizes are whole numbers and the
    bounds powers of two: 1 and 2 are exact). Ray's exported ``_sum`` of a histogram is an estimate
    from bucket midpoints, so a mean from it would be wrong. None without counts."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    finite = [le for le in bounds if not math.isinf(le)]
    for le in bounds:
        if buckets[le] >= rank:
            return le if not math.isinf(le) else (finite[-1] if finite else None)
    return None


def _delta(new: dict[float, float], old: dict[float, float]) -> dict[float, float]:
    return {le: max(n - old.get(le, 0.0), 0.0) for le, n in new.items()}


def interval_point(t: float, dt: float, old: VersionCounters, new: VersionCounters) -> dict:
    """What happened between two snapshots ``dt`` seconds apart, as one point of the series."""
    requests = max(new.requests - old.requests, 0.0)
    errors = max(new.errors - old.errors, 0.0)
    buckets = _delta(new.latency_buckets, old.latency_buckets)
    return {
        "t": t,
        "requests": new.requests,
        "errors": new.errors,
        "rate": requests / dt if dt > 0 else 0.0,
        "error_rate": errors / requests if requests else None,
        "p50_ms": quantile(0.5, buckets) if requests else None,
        "p99_ms": quantile(0.99, buckets) if requests else None,
        "batch": bucket_bound(0.5, _delta(new.batch_buckets, old.batch_buckets)),
    }


class MetricsHistory:
    """Snapshots kept while the console runs (one is added only when the exporter's numbers
    changed, or every ``idle_s``: Ray exports every few seconds, a page polls faster), and the
    series derived from them."""

    def __init__(self, keep: int = 360, idle_s: float = 30.0):
        self.keep = keep
        self.idle_s = idle_s
        self.snapshots: list[tuple[float, Snapshot]] = []

    def add(self, snapshot: Snapshot, now: float | None = None) -> bool:
        """Keep ``snapshot`` if it differs from the last one (or the last is old). Returns whether
        it was kept."""
        now = time.time() if now is None else now
        if self.snapshots:
            t, last = self.snapshots[-1]
            if last == snapshot and now - t < self.idle_s:
                return False
        self.snapshots.append((now, snapshot))
        del self.snapshots[: -self.keep]
        return True

    def series(self) -> dict[Key, list[dict]]:
        """Per (model, version): one point per interval between kept snapshots, oldest first."""
        out: dict[Key, list[dict]] = {}
        for (t0, old), (t1, new) in zip(self.snapshots, self.snapshots[1:], strict=False):
            for key, counters in new.items():
                out.setdefault(key, []).append(
                    interval_point(t1, t1 - t0, old.get(key, VersionCounters()), counters)
                )
        return out
