"""The one place that starts or connects to Ray, and checks that work can be placed."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from kiln.errors import KilnError, ResourceError


def quiet_ray_env() -> None:
    """Environment that keeps Ray's start-up chatter and progress bars out of the terminal."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def ensure_ray(
    address: str | None = None,
    num_cpus: float | None = None,
    debug: bool = False,
    runtime_env: dict[str, Any] | None = None,
) -> str:
    """Connect to ``address`` (or RAY_ADDRESS), else start a local instance. Returns the address.

    The local instance binds its dashboard to 127.0.0.1. Raises KilnError when an address is
    given but nothing answers there.
    """
    quiet_ray_env()
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = address or os.environ.get("RAY_ADDRESS") or None
    common = dict(
        logging_level=logging.DEBUG if debug else logging.ERROR,
        log_to_driver=debug,
        runtime_env=runtime_env,
        configure_logging=True,
    )
    if address and address.startswith("http"):
        raise KilnError(
            f"--address {address}: give the Ray cluster address (host:6379 or 'auto'), "
            "not the dashboard URL; use 'kiln submit' to send jobs through the Jobs API"
        )
    try:
        if address:
            ray.init(address=address, **{**common, "runtime_env": with_kiln_package(runtime_env)})
        else:
            # address="local": always a new instance; with None Ray would join whatever cluster
            # /tmp/ray/ray_current_cluster names (another user's, on a shared machine).
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                **common,
            )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "a new local instance"
        raise KilnError(f"cannot reach Ray at {where} ({str(exc).splitlines()[0]})") from None
    return ray.get_runtime_context().gcs_address


# The kiln package folder this process runs (shipped to workers as a py_module).
KILN_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def with_kiln_package(runtime_env: dict[str, Any] | None) -> dict[str, Any] | None:
    """The runtime env of a driver joining an existing cluster: ``runtime_env`` plus the kiln
    package this driver runs, as a py_module, so that every worker runs the driver's kiln (a node
    may have another kiln installed, or none). Unchanged when the caller or the submitted job's
    runtime env already ships py_modules (``kiln submit`` does; Ray refuses two py_modules
    fields)."""
    import json

    job_env = (
        json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    )
    given = {**job_env, **(runtime_env or {})}
    if "py_modules" in given:
        return runtime_env
    extra: dict[str, Any] = {"py_modules": [KILN_PACKAGE_DIR]}
    if "excludes" not in given:
        extra["excludes"] = ["__pycache__", "*.pyc"]
    return {**(runtime_env or {}), **extra}


def placeable_slots(per_worker: dict[str, float]) -> int:
    """How many bundles of ``per_worker`` resources the cluster's live nodes can hold in total."""
    import ray

    slots = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        fits = min(
            (math.floor(res.get(k, 0.0) / v + 1e-9) for k, v in per_worker.items() if v > 0),
            default=0,
        )
        slots += fits
    return slots


def check_placement(
    workers: int, per_worker: dict[str, float], what: str = "train.workers"
) -> None:
    """Raise ResourceError at once when ``workers`` bundles can never fit on the cluster's nodes."""
    import ray

    slots = placeable_slots(per_worker)
    if slots < workers:
        total = ray.cluster_resources()
        have = ", ".join(f"{total.get(k, 0):g} {k}" for k in per_worker)
        need = ", ".join(f"{v:g} {k}" for k, v in per_worker.items())
        raise ResourceError(
            f"{what}={workers} needs {workers} x ({need}) but the cluster can place only {slots} "
            f"(it has {have} in all); lower {what} or the per-worker resources"
        )
