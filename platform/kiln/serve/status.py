"""``kiln serve status``: what Kiln serves on a cluster, and each version's request and error
counts."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.compat import serve_grpc_port
from kiln.errors import KilnError, first_line, telling_line
from kiln.serve.cluster import (
    connect,
    find_target,
    forget,
    grpc_url,
    http_url,
    metrics_url,
    running_kiln_apps,
    serve_http,
)


@dataclass
class ServingStatus:
    """``kiln serve status``: where it serves, each application's state, each version's counters."""

    url: str | None
    ray_address: str
    ingress: str | None
    local_ray_pid: int | None
    applications: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    metrics_url: str | None = None
    console_url: str | None = None  # the Kiln console, when serving was started with one
    grpc_url: str | None = None  # the OIP gRPC service (host:port), when Serve serves gRPC
    # What could not be read (the model listing, the metrics endpoint): the CLI prints a warning
    # line for each; not in to_dict(), so the documented JSON stays as it was.
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The ``kiln serve status --json`` object."""
        data = asdict(self)
        data.pop("errors")
        return data


def serving_status(
    run_dir: str | Path, address: str | None = None, debug: bool = False
) -> ServingStatus:
    """Ask the cluster what Kiln serves there. Returns the status (``errors`` names what could not
    be read). Raises KilnError when nothing is found."""
    address, state = find_target(run_dir, address)
    local = state.local() if state and state.address == address else None
    if state is not None and local is not None and not local.alive():
        forget(run_dir, state)
        raise KilnError(
            f"the local Ray instance that served (pid {local.pid}) is gone; start again with "
            "'kiln serve start'"
        )
    gcs = connect(address, debug)
    apps = running_kiln_apps()
    if not apps:
        raise KilnError(f"Kiln serves nothing on the Ray cluster at {gcs}")
    host, port = serve_http()
    url = http_url(host, port)
    grpc_port = serve_grpc_port()
    status = ServingStatus(
        url=url,
        ray_address=gcs,
        ingress=state.ingress if state else None,
        local_ray_pid=local.pid if local else None,
        metrics_url=metrics_url(),
        console_url=state.console_url if state is not None and state.address == address else None,
        grpc_url=grpc_url(host, grpc_port) if grpc_port else None,
    )
    for name, app in sorted(apps.items()):
        replicas = {
            str(k): v for d in app.deployments.values() for k, v in d.replica_states.items()
        }
        status.applications[name] = {
            "status": str(app.status.value if hasattr(app.status, "value") else app.status),
            "replicas": replicas,
            "message": telling_line(app.message) if app.message else "",
        }
    status.models = _served_models(url, status.metrics_url, status.errors)
    return status


# What reading an HTTP endpoint of the serving cluster may raise (HTTPError is a URLError; an answer
# that is not the expected JSON: ValueError, KeyError, TypeError).
_READ_ERRORS = (urllib.error.URLError, OSError, ValueError, KeyError, TypeError)


def _served_models(url: str, metrics: str | None, errors: list[str]) -> list[dict[str, Any]]:
    """The root app's model listing, with per-version request and error counts from the metrics
    endpoint; what cannot be read is added to ``errors`` (the counts are then 0)."""
    try:
        with urllib.request.urlopen(f"{url}/v2/models", timeout=5) as resp:
            listing = json.loads(resp.read())["models"]
    except _READ_ERRORS as exc:
        errors.append(f"model listing {url}/v2/models: {first_line(exc)}")
        return []
    counts: dict[tuple[str, str], dict[str, float]] = {}
    if metrics:
        try:
            counts = scrape_counts(metrics)
        except _READ_ERRORS as exc:
            errors.append(f"metrics {metrics}: {first_line(exc)}")
    rows = []
    for model in listing:
        for version in model["versions"]:
            c = counts.get((model["name"], version), {})
            rows.append(
                {
                    "name": model["name"],
                    "version": version,
                    "default": version == model.get("default_version"),
                    "requests": int(c.get("requests", 0)),
                    "errors": int(c.get("errors", 0)),
                }
            )
    return rows


def scrape_counts(metrics: str) -> dict[tuple[str, str], dict[str, float]]:
    """(model, version) -> {requests, errors} summed over replicas, from Ray's Prometheus
    endpoint. Raises URLError or OSError when it cannot be read, ValueError when it is not
    Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, str], dict[str, float]] = {}
    wanted = {"ray_kiln_requests": "requests", "ray_kiln_request_errors": "errors"}
    for family in text_string_to_metric_families(text):
        key = wanted.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                ident = (sample.labels.get("model", ""), sample.labels.get("model_version", ""))
                out.setdefault(ident, {}).setdefault(key, 0.0)
                out[ident][key] += sample.value
    return out
