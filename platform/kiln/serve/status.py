"""``kiln serve status``: what Kiln serves on a cluster, and each version's request and error
counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.serve.cluster import (
    connect,
    find_target,
    forget,
    http_url,
    metrics_url,
    running_kiln_apps,
    telling_line,
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def serving_status(
    run_dir: str | Path, address: str | None = None, debug: bool = False
) -> ServingStatus:
    """Ask the cluster what Kiln serves there. Raises KilnError when nothing is found."""
    from ray.serve.context import _get_global_client

    address, state = find_target(run_dir, address)
    local = state.local() if state and state.address == address else None
    if local is not None and not local.alive():
        forget(run_dir, state)
        raise KilnError(
            f"the local Ray instance that served (pid {local.pid}) is gone; start again with "
            "'kiln serve start'"
        )
    gcs = connect(address, local.auth_mode if local else None, debug)
    apps = running_kiln_apps()
    if not apps:
        raise KilnError(f"Kiln serves nothing on the Ray cluster at {gcs}")
    http = _get_global_client().http_config
    url = http_url(http.host, int(http.port))
    status = ServingStatus(
        url=url,
        ray_address=gcs,
        ingress=state.ingress if state else None,
        local_ray_pid=local.pid if local else None,
        metrics_url=metrics_url(),
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
    status.models = _served_models(url, status.metrics_url)
    return status


def _served_models(url: str, metrics: str | None) -> list[dict[str, Any]]:
    """The root app's model listing, with per-version request and error counts from the metrics
    endpoint."""
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/v2/models", timeout=5) as resp:
            listing = json.loads(resp.read())["models"]
    except Exception:
        return []
    counts = scrape_counts(metrics) if metrics else {}
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
    endpoint."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(metrics, timeout=5) as resp:
            text = resp.read().decode()
    except Exception:
        return {}
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
