"""Where a model's rollout controller actor is found: its name and namespace, and the one lookup
(used by the replicas' agents and by the control plane)."""

from __future__ import annotations

from typing import Any

NAMESPACE = "kiln"


def controller_name(model: str) -> str:
    """The controller actor's name for ``model`` (in the ``kiln`` namespace)."""
    return f"kiln-rollout-{model}"


def find_controller(model: str) -> Any | None:
    """The running controller actor of ``model``, or None when there is none.

    Only "no such actor" (the ValueError of ``ray.get_actor``) means none: any other failure (no
    Ray connection, an unreachable GCS) propagates, so a caller never takes an outage for a missing
    controller.
    """
    import ray

    try:
        return ray.get_actor(controller_name(model), namespace=NAMESPACE)
    except ValueError:
        return None
