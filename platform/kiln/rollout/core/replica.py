"""The rollout's side inside a ModelServer replica: route, count, report, load new versions.

Nothing here is on the request path but ``route`` (a weighted choice on a local table) and
``record`` (a few counters). A background task reports the counts to the model's controller every
``REPORT_S`` and gets the routing table back in the same call; a version the table names that the
replica lacks is loaded off the event loop and smoke-checked before the replica reports it ready;
one it loaded that the table no longer names (a rolled-back candidate) is unloaded again.
A version loaded here runs in its own process (the server's ``load``); when that process dies,
``lost`` takes the version out of routing in this replica (its requests go to the stable version)
and reports the death to the controller at once, which rolls the candidate back.
Without a controller (no rollout ever started) or while it is unreachable, the last table stands.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kiln.errors import first_line
from kiln.rollout.core.actors import find_controller
from kiln.rollout.core.inflight import InflightJournal, journal_path
from kiln.rollout.core.routing import Router, RoutingTable
from kiln.rollout.core.stats import VersionWindow

logger = logging.getLogger("ray.serve")

REPORT_S = 0.5
LOOKUP_EVERY_S = 2.0  # how often a replica without a controller looks for one
CALL_TIMEOUT_S = 5.0


async def no_quality_signals(version: str) -> dict[str, float]:
    """The ``signals`` of a replica that monitors nothing: no data for any gate."""
    return {}


class RolloutAgent:
    """Per-replica rollout state. ``load(version, uri)`` is the server's coroutine that adds a
    version."""

    def __init__(
        self,
        model: str,
        default_version: str,
        ready_versions: list[str],
        load: Callable[[str, str], Awaitable[None]],
        signals: Callable[[str], Awaitable[dict[str, float]]],
        unload: Callable[[str], None] = lambda version: None,
        run_dir: str | None = None,
    ):
        self.model = model
        self.default_version = default_version
        self.table: RoutingTable | None = None
        self.router = Router()
        self.windows: dict[str, VersionWindow] = {}
        self.ready: dict[str, str] = {v: "ready" for v in ready_versions}
        self._load = load
        self._unload = unload
        self._added: set[str] = (
            set()
        )  # versions loaded for a rollout (the deployment's own stay for good)
        self._signals = signals
        self._loading: dict[str, asyncio.Task] = {}
        # versions whose process died here, until reported: version -> {"cause", "at"}
        self._lost: dict[str, dict[str, Any]] = {}
        self._wake: asyncio.Event | None = None  # set: report now, not at the next period
        self._handle: Any = None  # the controller actor's handle, once found
        self._looked_at = 0.0
        self._replica_id = _replica_id()
        self._warned = 0.0
        # requests in flight per version, in a file that outlives this process (its death is then
        # counted against the versions it was answering)
        self.inflight: InflightJournal | None = (
            InflightJournal(journal_path(run_dir, model, self._replica_id))
            if run_dir and self._replica_id != "local"
            else None
        )

    # --- the request path -----------------------------------------------------------------------

    def route(self, headers) -> str:
        """The version that answers an unversioned request: the table's choice if this replica has
        it ready, else the stable (or default) version."""
        table = self.table
        if table is None:
            return self.default_version
        stable = table.stable if self.ready.get(table.stable) == "ready" else self.default_version
        if table.candidate is None or self.ready.get(table.candidate) != "ready":
            return stable
        key = headers.get(table.sticky_header) if table.sticky_header else None
        chosen = self.router.choose(table, key)
        return chosen if chosen == table.candidate else stable

    def mirror_to(self, answered_by: str) -> str | None:
        """The candidate, when this request (answered by the stable version) is to be mirrored to
        it."""
        table = self.table
        if (
            table is None
            or table.candidate is None
            or answered_by == table.candidate
            or self.ready.get(table.candidate) != "ready"
        ):
            return None
        return table.candidate if self.router.mirror(table) else None

    def begin(self, version: str) -> None:
        """A client request to ``version`` starts (``end`` when it has its answer)."""
        if self.inflight is not None:
            self.inflight.begin(version)

    def end(self, version: str) -> None:
        if self.inflight is not None:
            self.inflight.end(version)

    def close(self) -> None:
        """The replica stops cleanly: nothing of it is left in flight."""
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None

    def lost(self, version: str, cause: str) -> None:
        """The process running ``version`` (a version a rollout loaded) died: it leaves routing
        here at once, and the controller hears of it in a report sent now. Once per death."""
        if version not in self._added or self.ready.get(version) != "ready":
            return  # already known, or being unloaded
        self.ready[version] = f"crashed: {cause}"[:300]
        self._lost[version] = {"cause": cause[:300], "at": time.time()}
        if self._wake is not None:
            self._wake.set()

    def record(self, version: str, status: int, latency_ms: float, routed: bool = True) -> None:
        """Count a request answered by ``version``; ``routed`` False for one that named its version
        (pinned: counted apart, never in gates)."""
        self.windows.setdefault(version, VersionWindow()).record(status, latency_ms, routed)

    def compare(self, version: str, agreed: int, rows: int) -> None:
        self.windows.setdefault(version, VersionWindow()).compare(agreed, rows)

    # --- the background report --------------------------------------------------------------------

    async def run_forever(self) -> None:
        self._wake = asyncio.Event()
        while True:
            try:  # every REPORT_S, or at once when a version's process died
                await asyncio.wait_for(self._wake.wait(), REPORT_S)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the controller restarting, a slow GCS: try again next time
                self._handle = None
                now = time.monotonic()
                if now - self._warned > 30:
                    self._warned = now
                    logger.warning(
                        "kiln rollout: report to the controller of '%s' failed: %s", self.model, exc
                    )

    async def sync(self) -> None:
        handle = await self._controller()
        stats, self.windows = self.windows, {}
        if handle is None:
            return
        for version, window in stats.items():  # the gates' quality signals, for the controller
            signals = await self._signals(version)
            if signals:
                window.signals = dict(signals)
        lost, self._lost = self._lost, {}
        payload = {
            "replica": self._replica_id,
            "ready": dict(self.ready),
            "stats": {v: w.to_dict() for v, w in stats.items()},
            "lost": lost,
        }
        try:
            table = await asyncio.wait_for(
                _await_ref(handle.report.remote(payload)), CALL_TIMEOUT_S
            )
        except BaseException:
            self._lost = {**lost, **self._lost}  # told next time
            raise
        routing = RoutingTable.from_dict(table)
        if routing is not None:
            self.apply(routing)

    def apply(self, table: RoutingTable) -> None:
        self.table = table
        for version in [
            v for v in self._added if v not in table.versions
        ]:  # a finished rollout's leftover
            self._added.discard(version)
            self.ready.pop(version, None)
            self._unload(version)
        for version, uri in table.versions.items():
            if version not in self.ready and version not in self._loading:
                self._loading[version] = asyncio.get_running_loop().create_task(
                    self._add(version, uri)
                )

    async def _add(self, version: str, uri: str) -> None:
        try:
            await self._load(version, uri)
            self.ready[version] = "ready"
            self._added.add(version)
        except Exception as exc:  # any load failure is the candidate's: reported, so it rolls back
            logger.exception("kiln rollout: loading %s failed", uri)
            self.ready[version] = f"failed: {type(exc).__name__}: {first_line(exc, 300)}"[:300]
        finally:
            self._loading.pop(version, None)

    async def _controller(self) -> Any:
        """The controller's handle; None when there is none (looked up at most every
        ``LOOKUP_EVERY_S``)."""
        if self._handle is not None:
            return self._handle
        now = time.monotonic()
        if now - self._looked_at < LOOKUP_EVERY_S:
            return None
        self._looked_at = now
        self._handle = await asyncio.to_thread(find_controller, self.model)
        return self._handle


async def _await_ref(ref) -> Any:
    return await ref


def _replica_id() -> str:
    import ray

    if not ray.is_initialized():  # built outside a replica: asking for the context would start Ray
        return "local"
    return ray.get_runtime_context().get_actor_id() or "local"
