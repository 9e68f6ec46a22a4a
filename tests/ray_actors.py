"""The live actors (and named tasks) of a Ray instance, from Ray's state API: what the tests look
for (Serve replicas to kill or measure, Ray Train's actors that must be gone, a trial's peer ranks)
without this process's Serve or Train clients, which another module's `kiln serve stop` can leave
holding dead handles."""

from __future__ import annotations

from typing import Any


def all_actors(address: str, state: str | None = None) -> list[Any]:
    """The actors of the instance at ``address`` (Ray's ``ActorState`` records; the dead ones
    included unless ``state`` names one)."""
    from ray.util.state import list_actors

    return list_actors(
        address=address,
        filters=[("state", "=", state)] if state else None,
        limit=10_000,
        timeout=30,
        raise_on_missing_output=False,
    )


def tasks_named(address: str, name: str) -> list[Any]:
    """The tasks of the instance at ``address`` whose function or method is ``name`` (e.g.
    ``"Class.method"``; Ray's ``TaskState`` records, ended ones included)."""
    from ray.util.state import list_tasks

    return list_tasks(
        address=address,
        filters=[("func_or_class_name", "=", name)],
        limit=10_000,
        timeout=30,
        raise_on_missing_output=False,
    )


def alive_actors(address: str) -> list[Any]:
    """Every actor of the instance at ``address`` in state ALIVE."""
    return all_actors(address, "ALIVE")


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
