"""The rollout controller: one detached, restartable Ray actor per served model (0 CPU).

Replicas call ``report`` every half second: they hand over their per-version statistics and get the
routing table back. Every gate interval the controller evaluates the gates on the candidate's
metrics of that interval and decides: roll back (a gate failed), hold (a gate has no data: the
interval does not count towards the bake time), advance to the next step or promote (the step has
run its bake time with every gate passing), or continue.
Every decision and its gate values go to the audit log; the record is saved on every change, and a
restarted controller (``max_restarts=-1``) reloads it and goes on where it was.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from kiln.compat import serve_controller_pid
from kiln.errors import ModelError, first_line
from kiln.rollout.core.actors import actor_fate
from kiln.rollout.core.inflight import journal_path, read_journal
from kiln.rollout.core.routing import RoutingTable
from kiln.rollout.core.spec import parse_gate
from kiln.rollout.core.stats import VersionWindow, metrics_of
from kiln.rollout.core.store import FINISHED, Phase, RolloutRecord, RolloutStore
from kiln.serve.ingress_stats import IngressCounters, model_counters
from kiln.serve.instance import load_state

logger = logging.getLogger(__name__)

REPLICA_STALE_S = 3.0  # a replica that has not reported for this long is taken as gone
SERVE_WATCH_S = 2.0  # how often Serve's controller is asked its process id during a rollout
IDLE_TICK_S = 1.0
# A retry storm: in one gate interval the ingress sent at least this many of the model's requests
# again (to a replica that refused or dropped them), and at least this share of its requests.
RETRY_STORM_MIN = 5
RETRY_STORM_SHARE = 0.01


class RolloutController:
    """Ray actor class (made remote by ``kiln.rollout.control.api.controller_for``)."""

    # What Ray says of a replica that stopped reporting (the unit tests give a fixed answer)
    fate = staticmethod(actor_fate)
    # The process id of Serve's controller, None when it does not answer (the same)
    serve_pid = staticmethod(serve_controller_pid)

    def ingress_counters(self) -> IngressCounters | None:
        """What the HAProxy ingress of this run dir's serving counted of the model (cumulative),
        None without one (``ingress: proxy``, another machine's run dir). The unit tests give
        their own."""
        state = load_state(self.run_dir)
        if state is None or not state.haproxy_dir:
            return None
        return model_counters(state.haproxy_dir, self.store.model)

    def __init__(self, run_dir: str, model: str, tracking_uri: str | None = None):
        self.run_dir = run_dir
        self.store = RolloutStore(run_dir, model)
        self.record: RolloutRecord | None = self.store.load()
        registry = tracking_uri or (self.record.tracking_uri if self.record else None)
        if registry and _in_actor():
            # MLflow imported and its store opened now, in the background: `start` asks the
            # registry whether the candidate exists while the CLI waits for the answer
            threading.Thread(target=_open_registry, args=(registry,), daemon=True).start()
        self.replicas: dict[
            str, dict[str, Any]
        ] = {}  # replica id -> {"seen": t, "ready": {version: state}}
        self.window: dict[str, VersionWindow] = {}
        self.last_metrics: dict[str, Any] = {}
        self.last_gates: dict[str, Any] = {}
        self.last_decision: dict[str, Any] = {}
        self._loop: asyncio.Task | None = None
        self._last_tick = 0.0
        # Serve's controller as last seen: (pid or None, monotonic time of the question)
        self._serve: tuple[int | None, float] = (None, 0.0)
        self.watch_serve = _in_actor()  # built outside Ray (the unit tests) there is no Serve
        # The ingress's counters as last read, and whether the last interval was a retry storm
        self._ingress: IngressCounters | None = None
        self._in_storm = False
        # Replicas with an in-flight file, as this controller starts: those that never report are
        # checked like replicas that stopped reporting (one may have died while no controller ran)
        started = time.monotonic()
        self._unseen = {
            path.stem: started for path in journal_path(run_dir, model, "-").parent.glob("*.bin")
        }
        if self.record is not None and _reconstructed():
            r = self.record
            # Ray restarted this actor after its process died: the record on disk is what survived
            self._audit(
                "restart",
                "fault",
                f"the rollout controller restarted (its process died); record reloaded: {r.phase}"
                + (f", step {r.step}, {r.baked_s:.1f}s of {r.bake_s:g}s baked" if r.active else ""),
                extra={"fault": "controller_restart", "baked_s": r.baked_s},
            )

    def _current(self) -> RolloutRecord:
        """The record, in the code paths that run only once a rollout was started."""
        if self.record is None:
            raise RuntimeError(f"no rollout of '{self.store.model}' is recorded")
        return self.record

    # --- called by replicas ---------------------------------------------------------------------

    async def report(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """A replica's statistics since its last report; returns the routing table (None: no rollout
        yet)."""
        self._ensure_loop()
        self._unseen.pop(payload["replica"], None)
        self.replicas[payload["replica"]] = {
            "seen": time.monotonic(),
            "ready": payload.get("ready", {}),
        }
        for version, data in payload.get("stats", {}).items():
            self.window.setdefault(version, VersionWindow()).add(VersionWindow.from_dict(data))
        for version, death in payload.get("lost", {}).items():
            self._version_lost(payload["replica"], version, death)
        return self.table()

    def _version_lost(self, replica: str, version: str, death: dict[str, Any]) -> None:
        """A replica's process of ``version`` (one a rollout loaded: it runs apart from the
        replica's own versions) died. An audit entry says so; when it is the candidate of the
        rollout in progress, it is a restart of the candidate and the rollout is rolled back at
        once (its requests already go to the stable version on that replica)."""
        r = self.record
        if r is None:
            return
        cause = str(death.get("cause", ""))
        candidate = r.active and version == r.candidate
        if candidate:
            r.restarts[version] = r.restarts.get(version, 0) + 1
            self._save()
        self._audit(
            "version_lost",
            "fault",
            f"v{version}'s process died on replica {replica[:12]}: {cause}",
            extra={
                "fault": "version_process_death",
                "replica": replica,
                "version": version,
                "cause": cause,
                "crashed_at": death.get("at"),
            },
        )
        if candidate:
            self._roll_back("fault", f"v{version}'s process died on a replica: {cause}")

    def table(self) -> dict[str, Any] | None:
        r = self.record
        if r is None:
            return None
        versions = {r.stable: r.stable_uri}
        if (
            r.previous and r.previous_uri and r.phase in FINISHED
        ):  # kept loaded: an instant rollback
            versions[r.previous] = r.previous_uri
        if r.active and r.candidate and r.candidate_uri:
            versions[r.candidate] = r.candidate_uri
            return RoutingTable(
                stable=r.stable,
                candidate=r.candidate,
                weight=r.weight,
                shadow=r.shadow if r.phase != Phase.PREPARING else 0.0,
                sticky_header=r.sticky_header,
                versions=versions,
                revision=r.revision,
            ).to_dict()
        return RoutingTable(stable=r.stable, versions=versions, revision=r.revision).to_dict()

    # --- called by the CLI / API ----------------------------------------------------------------

    async def start(self, record: dict[str, Any], trigger: str) -> dict[str, Any]:
        """Begin a rollout (the record comes checked from ``api.start_rollout``). Returns the
        record."""
        self._ensure_loop()
        if self.record is not None and self.record.active:
            return {
                "error": f"a rollout of '{self.record.model}' to v{self.record.candidate} is in "
                "progress "
                f"({self.record.phase}); promote or roll it back first"
            }
        new = RolloutRecord.from_dict(record)
        # A version unknown to the registry is the user's error, answered in this call (the actor
        # has MLflow warm; built outside Ray, in the unit tests, there is no registry to ask).
        if new.candidate_uri and _in_actor():
            unknown = await asyncio.to_thread(_unknown_version, new.tracking_uri, new.candidate_uri)
            if unknown is not None:
                return {"error": unknown}
        if self.record is not None:  # what was promoted before stays known
            new.previous, new.previous_uri = self.record.previous, self.record.previous_uri
        new.phase, new.step, new.weight, new.trigger = Phase.PREPARING, -1, 0.0, trigger
        new.started_at = time.time()
        new.revision = (self.record.revision if self.record else 0) + 1
        self.record = new
        self.window.clear()
        self._audit(  # first, as in _changed
            "start",
            trigger,
            f"{new.strategy} rollout v{new.stable} -> v{new.candidate}; waiting for every "
            "replica to load and smoke-check the candidate",
        )
        self._save()
        return self.record.to_dict()

    async def command(self, action: str, trigger: str = "user") -> dict[str, Any]:
        """promote | rollback | pause | resume. Returns the record, or {"error": ...}."""
        self._ensure_loop()
        r = self.record
        if r is None:
            return {"error": f"no rollout of '{self.store.model}' is recorded"}
        if action == "promote":
            if not r.active:
                return {
                    "error": f"no rollout of '{r.model}' in progress to promote (last: {r.phase})"
                }
            await self._promote(trigger, "promoted by hand")
        elif action == "rollback":
            if r.active:
                self._roll_back(trigger, "rolled back by hand")
            elif r.phase == Phase.PROMOTED and r.previous:
                await self._undo_promotion(trigger)
            else:
                return {"error": f"nothing to roll back for '{r.model}' (last: {r.phase})"}
        elif action == "pause":
            if r.phase not in (Phase.PREPARING, Phase.RUNNING):
                return {
                    "error": f"no rollout of '{r.model}' in progress to pause (last: {r.phase})"
                }
            r.reason = f"paused from {r.phase}"
            r.phase = Phase.PAUSED
            self._changed("pause", trigger, "the ramp holds; gates are still evaluated")
        elif action == "resume":
            if r.phase != Phase.PAUSED:
                return {"error": f"the rollout of '{r.model}' is not paused ({r.phase})"}
            r.phase = Phase.RUNNING if r.step >= 0 else Phase.PREPARING
            r.step_started_at, r.baked_s = time.time(), 0.0  # the step bakes again in full
            r.reason = ""
            self._changed("resume", trigger, "the step's bake time starts again")
        else:
            return {"error": f"unknown action '{action}'"}
        return self._current().to_dict()

    async def status(self) -> dict[str, Any]:
        self._ensure_loop()
        now = time.monotonic()
        live = {
            rid: info["ready"]
            for rid, info in self.replicas.items()
            if now - info["seen"] < REPLICA_STALE_S
        }
        return {
            "record": self.record.to_dict() if self.record else None,
            "metrics": self.last_metrics,
            "gates": self.last_gates,
            "decision": self.last_decision,
            "replicas": live,
            "table": self.table(),
        }

    # --- the gate loop --------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            r = self.record
            await asyncio.sleep(r.interval_s if r is not None and r.active else IDLE_TICK_S)
            try:
                await self._tick()
            except Exception:  # keep evaluating: one bad tick must not end the rollout
                logger.exception("kiln rollout: gate evaluation failed")

    async def _tick(self) -> None:
        r = self.record
        now = time.monotonic()
        # the evaluated interval's length (capped: a stalled loop must not count as a long passing
        # bake)
        elapsed = (
            min(now - self._last_tick, 2 * r.interval_s)
            if r is not None and self._last_tick
            else 0.0
        )
        self._last_tick = now
        await self._find_lost_replicas()  # their requests in flight go into this window
        if r is not None and r.active and self.watch_serve:
            await self._watch_serve_controller(now)
            await self._watch_ingress()
        window, self.window = self.window, {}
        metrics = {v: metrics_of(w) for v, w in window.items()}
        self.last_metrics = {v: m.to_dict() for v, m in metrics.items()}
        if r is None or not r.active:
            return
        if r.phase == Phase.PREPARING:
            self._check_ready()
            return
        candidate = metrics.get(r.candidate) if r.candidate else None
        gates = {}
        for expr in r.gates:
            gate = parse_gate(expr)
            if gate.signal == "restarts":  # counted over the whole rollout, never "no data"
                value: float | None = float(r.restarts.get(r.candidate or "", 0))
            else:
                value = candidate.value(gate.signal) if candidate else None
            gates[gate.expr] = {"value": value, "ok": gate.check(value)}
        self.last_gates = gates
        failed = [
            f"{name} failed ({_fmt(g['value'])})" for name, g in gates.items() if g["ok"] is False
        ]
        if failed:
            self._roll_back("gate", "; ".join(failed), gates)
            return
        missing = [name for name, g in gates.items() if g["ok"] is None]
        if r.phase == Phase.PAUSED:
            self._audit("paused", "gate", "held by hand", gates)
        elif missing:
            self._audit("hold", "gate", f"no data for {', '.join(missing)}", gates)
        elif r.baked_s + elapsed < r.bake_s:
            r.baked_s += (
                elapsed  # only intervals with every gate passing count towards the bake time
            )
            self._save()
            self._audit("continue", "gate", "", gates)
        elif r.step + 1 < len(r.steps):
            r.step += 1
            r.weight = r.steps[r.step]
            r.step_started_at, r.baked_s = time.time(), 0.0
            self._changed("advance", "auto", f"step {r.step} baked with every gate passing", gates)
        else:
            await self._promote("auto", "every step baked with every gate passing", gates)

    async def _watch_serve_controller(self, now: float) -> None:
        """A restart of Serve's controller during a rollout goes to the audit log: requests never
        pass through it (replicas answer meanwhile), but it restarts replicas and the ingress, and
        an operator reading the rollout's history should see it. Seen as a new process id, or as
        no answer (its death) followed by one."""
        last_pid, asked = self._serve
        if now - asked < SERVE_WATCH_S:
            return
        pid = await asyncio.to_thread(self.serve_pid)
        if pid is None:
            self._serve = (last_pid, now)  # dead or restarting: its successor is compared to it
            return
        self._serve = (pid, now)
        if last_pid is not None and pid != last_pid:
            self._audit(
                "restart",
                "fault",
                f"Serve's controller restarted (its process {last_pid} died; now {pid}); the "
                "replicas kept answering",
                extra={"fault": "serve_controller_restart", "pid": pid, "previous_pid": last_pid},
            )

    async def _watch_ingress(self) -> None:
        """A retry storm during a rollout goes to the audit log: the ingress sending many of the
        model's requests again (replicas refusing connections or dying mid-request) is a fault
        that clients may not see (the retries answer them) but an operator should. One entry per
        storm (consecutive intervals are one storm), from HAProxy's own counters."""
        try:
            counters = await asyncio.to_thread(self.ingress_counters)
        except Exception as exc:  # the state file or HAProxy unreadable: ask again next interval
            logger.warning("kiln rollout: the ingress's counters unread: %s", first_line(exc))
            return
        if counters is None:
            return
        earlier, self._ingress = self._ingress, counters
        if earlier is None:  # the first reading is the baseline, not an interval's traffic
            return
        added = counters.since(earlier)
        storm = added.retries >= max(RETRY_STORM_MIN, RETRY_STORM_SHARE * added.requests)
        if storm and not self._in_storm:
            self._audit(
                "retry_storm",
                "fault",
                f"the ingress sent {added.retries} of {added.requests} requests again in one "
                f"interval ({added.redispatches} to another replica, {added.errors_5xx} "
                "answered 5xx)",
                extra={
                    "fault": "retry_storm",
                    "retries": added.retries,
                    "redispatches": added.redispatches,
                    "requests": added.requests,
                    "errors_5xx": added.errors_5xx,
                },
            )
        self._in_storm = storm

    async def _find_lost_replicas(self) -> None:
        """Replicas that stopped reporting: ask Ray whether each is dead. A dead one's requests in
        flight (its in-flight file) are errors of their versions in this interval, and a restart
        of each version it was answering; the death goes to the audit log with its cause. A
        replica Serve stopped on purpose with nothing in flight (scale-down, redeploy) is just
        forgotten."""
        now = time.monotonic()
        for rid, since in list(self._unseen.items()):
            if now - since >= REPLICA_STALE_S:  # never reported to this controller
                del self._unseen[rid]
                self.replicas.setdefault(rid, {"seen": since, "ready": {}})
        for rid, info in list(self.replicas.items()):
            if (
                now - info["seen"] < REPLICA_STALE_S
                or now - info.get("asked", 0.0) < REPLICA_STALE_S
            ):
                continue
            info["asked"] = now
            try:
                fate = await asyncio.to_thread(self.fate, rid)
            except Exception as exc:  # the state API unreachable: ask again later
                logger.warning(
                    "kiln rollout: state of replica %s unknown: %s", rid, first_line(exc)
                )
                continue
            if fate.alive:
                continue  # slow to report (a long request, a loaded node), not gone
            del self.replicas[rid]
            path = journal_path(self.run_dir, self.store.model, rid)
            lost = read_journal(path)
            path.unlink(missing_ok=True)
            if fate.intended and not lost:
                continue
            for version, n in lost.items():
                self.window.setdefault(version, VersionWindow()).record_lost(n)
            r = self.record
            if r is None:
                continue
            if r.active:
                for version in lost:
                    r.restarts[version] = r.restarts.get(version, 0) + 1
                self._save()
            in_flight = ", ".join(f"v{v}: {n}" for v, n in sorted(lost.items())) or "none"
            self._audit(
                "replica_lost",
                "fault",
                f"replica {rid[:12]} died ({fate.cause}); requests in flight: {in_flight}",
                extra={
                    "fault": "replica_death",
                    "replica": rid,
                    "cause": fate.cause,
                    "in_flight": lost,
                },
            )

    def _check_ready(self) -> None:
        """Preparing: start step 0 once every live replica has loaded and smoke-checked the
        candidate."""
        r = self._current()
        now = time.monotonic()
        live = {
            rid: info["ready"]
            for rid, info in self.replicas.items()
            if now - info["seen"] < REPLICA_STALE_S
        }
        failed = {
            rid: ready[r.candidate]
            for rid, ready in live.items()
            if str(ready.get(r.candidate, "")).startswith("failed")
        }
        if failed:
            self._roll_back(
                "gate", f"v{r.candidate} failed to load on a replica: {next(iter(failed.values()))}"
            )
            return
        if live and all(ready.get(r.candidate) == "ready" for ready in live.values()):
            r.phase, r.step, r.weight = Phase.RUNNING, 0, r.steps[0]
            r.step_started_at, r.baked_s = time.time(), 0.0
            self._changed(
                "step", "auto", f"v{r.candidate} loaded and smoke-checked on {len(live)} replica(s)"
            )

    # --- decisions ------------------------------------------------------------------------------

    async def _promote(self, trigger: str, reason: str, gates: dict | None = None) -> None:
        r = self._current()
        candidate, candidate_uri, revision = r.candidate, r.candidate_uri, r.revision
        if candidate is None or candidate_uri is None:
            raise RuntimeError(f"no candidate to promote in the rollout of '{r.model}'")
        # The registry alias moves first (seconds): until the record changes, the routing table
        # replicas get is the old one, so record on disk and routing never disagree; the record is
        # saved in the same step as the change replicas read (no await in between).
        alias = await self._move_champion(candidate)
        if self.record is not r or r.revision != revision:  # a command came in meanwhile
            await self._move_champion(r.stable)
            return
        r.previous, r.previous_uri = r.stable, r.stable_uri
        r.stable, r.stable_uri = candidate, candidate_uri
        r.phase, r.weight, r.reason, r.finished_at = Phase.PROMOTED, 0.0, reason, time.time()
        self._changed("promote", trigger, reason + alias, gates)

    async def _undo_promotion(self, trigger: str) -> None:
        r = self._current()
        previous, previous_uri, revision = r.previous, r.previous_uri, r.revision
        if previous is None or previous_uri is None:
            raise RuntimeError(f"no previous version of '{r.model}' to return to")
        alias = await self._move_champion(previous)  # first: see _promote
        if self.record is not r or r.revision != revision:
            await self._move_champion(r.stable)
            return
        demoted = r.stable
        r.stable, r.stable_uri, r.previous, r.previous_uri = (
            previous,
            previous_uri,
            r.stable,
            r.stable_uri,
        )
        r.phase, r.reason, r.finished_at = (
            Phase.ROLLED_BACK,
            f"promotion of v{demoted} undone by hand",
            time.time(),
        )
        self._changed("rollback", trigger, r.reason + alias)

    def _roll_back(self, trigger: str, reason: str, gates: dict | None = None) -> None:
        r = self._current()
        r.phase, r.weight, r.reason, r.finished_at = Phase.ROLLED_BACK, 0.0, reason, time.time()
        self._changed("rollback", trigger, reason, gates)

    async def _move_champion(self, version: str) -> str:
        """Point the registry alias ``champion`` at ``version``; returns a note for the audit
        log."""
        from kiln import tracking as trk

        r = self._current()
        try:
            await asyncio.to_thread(
                trk.set_alias, r.tracking_uri, r.registered_name, "champion", version
            )
        except Exception as exc:  # the routing decision stands; the log says the alias did not move
            return f"; alias 'champion' NOT moved: {type(exc).__name__}: {first_line(exc)}"
        return f"; alias 'champion' -> {r.registered_name} v{version}"

    def _changed(self, decision: str, trigger: str, reason: str, gates: dict | None = None) -> None:
        # the audit entry first: whoever reads the new phase from the record finds its reason in
        # the audit log (a full run read "rolled_back", then an audit log one entry behind)
        self._audit(decision, trigger, reason, gates)
        self._commit()

    def _commit(self) -> None:
        """A new revision of the record, saved: the routing table replicas get comes from it."""
        self._current().revision += 1
        self._save()

    def _save(self) -> None:
        self.store.save(self._current())

    def _audit(
        self,
        decision: str,
        trigger: str,
        reason: str,
        gates: dict | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        r = self._current()
        weights = {r.stable: round(100.0 - r.weight, 3)}
        if r.candidate and r.active:
            weights[r.candidate] = r.weight
        entry = {
            "step": r.step,
            "phase": r.phase,
            "weights": weights,
            "shadow": r.shadow if r.active else 0.0,
            "gates": gates or {},
            "decision": decision,
            "trigger": trigger,
            "reason": reason,
            "metrics": self.last_metrics,
            **(extra or {}),
        }
        self.last_decision = self.store.audit(entry)


def _in_actor() -> bool:
    """Whether this runs inside a Ray actor (the controller as deployed), not a controller built in
    a process that merely has Ray connected (unit tests after another module started Ray)."""
    import ray

    return bool(ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None)


def _open_registry(tracking_uri: str) -> None:
    """Import MLflow and open the registry's store (its schema checked): a warm-up, so failures
    are left to the calls that need it."""
    from kiln import tracking as trk

    try:
        trk.client(tracking_uri)
    except Exception:  # a warm-up only: the call that needs the registry reports its error
        logger.debug("kiln rollout: opening the registry %s failed", tracking_uri, exc_info=True)


def _unknown_version(tracking_uri: str, uri: str) -> str | None:
    """Why ``uri`` (``models:/NAME/VERSION``) is not a registry version, or None when it is."""
    from kiln import tracking as trk

    try:
        trk.model_version_for(tracking_uri, uri)
    except ModelError as exc:
        return first_line(exc)
    return None


def _reconstructed() -> bool:
    """Whether this actor is a restart by Ray (its earlier process died), not its first start."""
    import ray

    # Built outside an actor (unit tests), Ray connected or not: Ray asserts on the question there.
    if not _in_actor():
        return False
    return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def _fmt(value: float | None) -> str:
    return "no data" if value is None else f"{value:.4g}"
