"""Per-version request metrics, exported in Prometheus format through Ray's metrics agent.

Ray prefixes custom metrics with ``ray_`` and adds the Serve tags (application, deployment,
replica); see the README's "Serving" section for the exported names. Labels: ``model``,
``model_version``, ``endpoint`` (infer | predict), and ``code`` (HTTP status) on errors.
"""

from __future__ import annotations

from typing import Any

LATENCY_BOUNDARIES_MS = [
    0.5,
    1,
    2,
    3,
    5,
    7.5,
    10,
    15,
    20,
    30,
    50,
    75,
    100,
    200,
    500,
    1000,
    2500,
    5000,
]
BATCH_BOUNDARIES = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]
# Ray 2.60 annotates ``tag_keys`` as ``Tuple[str]`` (one element) though it takes any number.
TagKeys = Any


class ServeMetrics:
    """The metric objects of one replica (Ray Serve adds the replica's own tags)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        version_tags: TagKeys = ("model", "model_version", "endpoint")
        model_tags: TagKeys = ("model", "model_version")
        self.requests = Counter(
            "kiln_requests",
            description="Inference requests answered, per model version.",
            tag_keys=version_tags,
        )
        self.errors = Counter(
            "kiln_request_errors",
            description="Inference requests answered with an error "
            "status, per model version and HTTP status.",
            tag_keys=version_tags + ("code",),
        )
        self.latency = Histogram(
            "kiln_request_latency_ms",
            description="Time from request to response inside the replica, in milliseconds.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=version_tags,
        )
        self.batch_size = Histogram(
            "kiln_batch_size",
            description="Rows per model call (after dynamic batching).",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=model_tags,
        )

    def request(
        self, model: str, version: str, endpoint: str, status: int, latency_ms: float
    ) -> None:
        tags = {"model": model, "model_version": version, "endpoint": endpoint}
        self.requests.inc(1, tags=tags)
        self.latency.observe(latency_ms, tags=tags)
        if status >= 400:
            self.errors.inc(1, tags={**tags, "code": str(status)})

    def batch(self, model: str, version: str, rows: int) -> None:
        self.batch_size.observe(rows, tags={"model": model, "model_version": version})
