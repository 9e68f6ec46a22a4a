"""The live actors of a Ray instance, from Ray's state API: what the tests look for (Serve replicas
to kill or measure, Ray Train's actors that must be gone) without this process's Serve or Train
clients, which another module's `kiln serve stop` can leave holding dead handles."""

from __future__ import annotations

from typing import Any


def alive_actors(address: str) -> list[Any]:
    """Every actor of the instance at ``address`` in state ALIVE (Ray's ``ActorState`` records)."""
    from ray.util.state import list_actors

    return list_actors(
        address=address,
        filters=[("state", "=", "ALIVE")],
        limit=10_000,
        timeout=30,
        raise_on_missing_output=False,
    )


def actor_pids(address: str, name_prefix: str) -> dict[str, int]:
    """Live named actors whose name starts with ``name_prefix``: name -> process id."""
    return {
        a.name: a.pid
        for a in alive_actors(address)
        if a.name and a.name.startswith(name_prefix) and a.pid
    }


def replica_pids(address: str, app: str = "kiln-") -> dict[str, int]:
    """Serve replicas of the applications whose name starts with ``app``: actor name -> pid."""
    return actor_pids(address, f"SERVE_REPLICA::{app}")

