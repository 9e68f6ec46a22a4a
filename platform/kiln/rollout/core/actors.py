"""Where a model's rollout controller actor is found: its name and namespace, and the one lookup
(used by the replicas' agents and by the control plane)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.errors import telling_line

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


@dataclass
class ActorFate:
    """What Ray knows of an actor: ``alive`` (None: Ray has no record of it), and why it died."""

    alive: bool | None
    cause: str = ""
    intended: bool = False  # stopped on purpose (ray.kill, out of scope), not a crash


# Ray's ActorDiedErrorContext reasons that mean the actor was stopped on purpose (Serve stops a
# replica it scales down or replaces with ray.kill)
INTENDED_DEATHS = ("RAY_KILL", "OUT_OF_SCOPE", "REF_DELETED")


def actor_fate(actor_id: str) -> ActorFate:
    """Ask Ray's state API whether actor ``actor_id`` (hex) is alive, and if not, why it died.
    Raises what the state API raises when it cannot answer (RayStateApiException,
    ConnectionError)."""
    import ray
    from ray.util.state import get_actor

    state = get_actor(actor_id, address=ray.get_runtime_context().gcs_address, timeout=10)
    if state is None:
        return ActorFate(alive=None, cause="unknown to Ray")
    if state.state != "DEAD":
        return ActorFate(alive=True)
    context = (state.death_cause or {}).get("actor_died_error_context") or {}
    reason = str(context.get("reason") or "UNSPECIFIED")
    message = str(context.get("error_message") or "")
    cause = f"{reason}: {telling_line(message, 200)}" if message.strip() else reason
    return ActorFate(alive=False, cause=cause, intended=reason in INTENDED_DEATHS)
