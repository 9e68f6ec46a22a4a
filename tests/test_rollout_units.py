"""Rollout logic without a cluster: options and gates, routing shares and sticky buckets, windowed
metrics, and the controller's decisions fed with replica reports (a real store in a temp dir)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from kiln.errors import KilnError
from kiln.rollout.control.controller import RolloutController
from kiln.rollout.core.routing import Router, RoutingTable, sticky_bucket
from kiln.rollout.core.spec import RolloutOptions, parse_duration, parse_gate
from kiln.rollout.core.stats import VersionWindow, metrics_of
from kiln.rollout.core.store import RolloutRecord, RolloutStore


def test_durations_and_gates_parse_or_fail_with_a_clear_message():
    assert [parse_duration(t) for t in ("500ms", "5s", "2m", "1.5h", "3")] == [
        0.5,
        5.0,
        120.0,
        5400.0,
        3.0,
    ]
    with pytest.raises(KilnError, match="'5 minutes' is not a duration"):
        parse_duration("5 minutes")
    with pytest.raises(KilnError, match="must be positive"):
        parse_duration("0s")
    gate = parse_gate("p99_ms < 200")
    assert (gate.signal, gate.op, gate.threshold, gate.expr) == ("p99_ms", "<", 200.0, "p99_ms<200")
    assert (gate.check(150.0), gate.check(250.0), gate.check(None)) == (True, False, None)
    assert parse_gate("agreement>=0.9").check(0.9) is True
    assert parse_gate("drift<0.2").check(None) is None  # a quality signal not reported yet: no data
    with pytest.raises(KilnError, match="unknown signal 'latency'"):
        parse_gate("latency<5")


def test_strategies_resolve_to_steps():
    assert RolloutOptions().plan("canary")[:2] == ([5.0], 0.0)
    assert RolloutOptions(weight=20).plan("shadow")[:2] == ([0.0], 20.0)
    assert RolloutOptions().plan("linear")[0] == [10.0, 25.0, 50.0, 100.0]
    assert RolloutOptions().plan("blue-green")[0] == [100.0]
    with pytest.raises(KilnError, match="--steps applies to the linear strategy"):
        RolloutOptions(steps=[10, 100]).plan("canary")
    with pytest.raises(KilnError, match="needs mirrored traffic"):
        RolloutOptions(gates=["agreement>0.9"]).plan("linear")


def test_weighted_choice_hits_the_share_and_sticky_keys_move_once():
    router = Router()
    table = RoutingTable(stable="1", candidate="2", weight=10.0)
    counts = Counter(router.choose(table, None) for _ in range(1000))
    assert abs(counts["2"] - 100) <= 2  # the Weyl sequence: within a request or two of the weight
    keys = [f"user-{i}" for i in range(2000)]
    assert all(sticky_bucket(k) == sticky_bucket(k) and 0 <= sticky_bucket(k) < 100 for k in keys)
    seen: dict[str, list[str]] = {k: [] for k in keys}
    for weight in (10.0, 25.0, 50.0, 100.0):  # a ramp: a key never returns to the stable version
        table = RoutingTable(stable="1", candidate="2", weight=weight)
        for k in keys:
            seen[k].append(router.choose(table, k))
    assert all(path == sorted(path) for path in seen.values())  # "1"... then "2"...
    assert abs(sum(path[0] == "2" for path in seen.values()) / len(keys) - 0.10) < 0.03
    mirror = Router()
    shadow = RoutingTable(stable="1", candidate="2", shadow=25.0)
    assert sum(mirror.mirror(shadow) for _ in range(400)) == 100


def test_windows_add_up_across_replicas():
    a, b = VersionWindow(), VersionWindow()
    for i in range(99):
        a.record(200, float(i + 1))
    b.record(503, 500.0)
    b.record(404, 1.0)  # a client's mistake: not an error of the version
    b.compare(agreed=3, rows=4)
    a.signals, b.signals = {"drift": 0.1}, {"drift": 0.3}
    total = VersionWindow()
    total.add(VersionWindow.from_dict(a.to_dict()))
    total.add(VersionWindow.from_dict(b.to_dict()))
    m = metrics_of(total)
    # nearest-rank percentiles over 1, 2, ..., 99, 500 (the 404 is counted apart, not gated)
    assert (m.requests, m.errors, m.agreement, m.p50_ms, m.p99_ms) == (100, 1, 0.75, 50.0, 99.0)
    assert m.error_rate == pytest.approx(1 / 100) and m.signals["drift"] == pytest.approx(0.2)
    assert (m.client_errors, m.pinned) == (1, 0)
    assert metrics_of(VersionWindow()).error_rate is None


def _record(**kw) -> dict:
    return RolloutRecord(
        model="m",
        registered_name="m",
        tracking_uri="sqlite:////nonexistent/x.db",
        stable="1",
        stable_uri="models:/m/1",
        candidate="2",
        candidate_uri="models:/m/2",
        strategy="linear",
        steps=[50.0, 100.0],
        bake_s=0.0,
        interval_s=1.0,
        **kw,
    ).to_dict()


def _report(ctl, ready, requests=0, errors=0, routed=True, status=500):
    stats = VersionWindow()
    for i in range(requests):
        stats.record(status if i < errors else 200, 5.0, routed)
    return ctl.report({"replica": "r1", "ready": ready, "stats": {"2": stats.to_dict()}})


@pytest.mark.parametrize(
    "what, kwargs",
    [
        ("pinned good requests", {"requests": 50, "routed": False}),
        ("pinned failing requests", {"requests": 50, "errors": 50, "routed": False}),
        ("routed client errors", {"requests": 50, "errors": 50, "status": 400}),
    ],
)
def test_pinned_requests_and_client_errors_do_not_move_the_gates(tmp_path, what, kwargs):
    """A client cannot promote a candidate by pinning good traffic to it, nor roll it back by
    pinning bad requests or sending requests it answers 4xx: the step holds (no gated data), and
    the status shows them apart."""

    async def scenario():
        ctl = RolloutController(str(tmp_path), "m")
        await ctl.start(_record(gates=["error_rate<0.1"]), "user")
        await _report(ctl, {"1": "ready", "2": "ready"})
        await ctl._tick()
        assert (ctl.record.phase, ctl.record.weight) == ("running", 50.0)
        await _report(ctl, {"1": "ready", "2": "ready"}, **kwargs)
        await ctl._tick()
        return ctl

    ctl = asyncio.run(scenario())
    assert (ctl.record.phase, ctl.record.weight) == ("running", 50.0), what
    assert ctl.last_decision["decision"] == "hold", what


def test_controller_waits_for_replicas_advances_holds_and_rolls_back(tmp_path):
    async def scenario():
        ctl = RolloutController(str(tmp_path), "m")
        await ctl.start(_record(gates=["error_rate<0.1"]), "monitor")
        table = await _report(ctl, {"1": "ready"})
        assert (table["candidate"], table["weight"], table["versions"]) == (
            "2",
            0.0,
            {"1": "models:/m/1", "2": "models:/m/2"},
        )
        await ctl._tick()
        assert ctl.record.phase == "preparing"  # the replica has not loaded v2 yet
        await _report(ctl, {"1": "ready", "2": "ready"})
        await ctl._tick()
        assert (ctl.record.phase, ctl.record.weight) == ("running", 50.0)
        await ctl._tick()  # no candidate traffic: no data, the step holds
        assert ctl.record.weight == 50.0 and ctl.last_decision["decision"] == "hold"
        await _report(ctl, {"1": "ready", "2": "ready"}, requests=20)
        await ctl._tick()
        assert ctl.record.weight == 100.0
        await _report(ctl, {"1": "ready", "2": "ready"}, requests=20, errors=5)
        await ctl._tick()
        return ctl

    ctl = asyncio.run(scenario())
    assert ctl.record.phase == "rolled_back" and ctl.record.stable == "1"
    entries = RolloutStore(tmp_path, "m").history()
    assert [e["decision"] for e in entries] == ["start", "step", "hold", "advance", "rollback"]
    assert entries[0]["trigger"] == "monitor" and entries[-1]["trigger"] == "gate"
    assert entries[-1]["reason"] == "error_rate<0.1 failed (0.25)"
    assert (
        RolloutStore(tmp_path, "m").load().phase == "rolled_back"
    )  # persisted: a new controller sees it


def test_controller_promotes_remembers_the_previous_version_and_reloads(tmp_path):
    async def scenario():
        ctl = RolloutController(str(tmp_path), "m")
        await ctl.start(_record(gates=[]), "user")
        await _report(ctl, {"1": "ready", "2": "ready"})
        await ctl._tick()
        assert (await ctl.command("pause"))["phase"] == "paused"
        await ctl._tick()
        assert ctl.record.weight == 50.0  # paused: no advance
        await ctl.command("resume")
        await ctl._tick()
        await ctl._tick()
        assert ctl.record.phase == "promoted"
        again = RolloutController(str(tmp_path), "m")  # a restarted controller
        table = again.table()
        undo = await again.command("rollback")
        return table, undo, await again.command("promote")

    table, undo, refused = asyncio.run(scenario())
    assert table == {
        "stable": "2",
        "candidate": None,
        "weight": 0.0,
        "shadow": 0.0,
        "sticky_header": None,
        "versions": {"2": "models:/m/2", "1": "models:/m/1"},
        "revision": table["revision"],
    }
    assert (undo["phase"], undo["stable"], undo["previous"]) == ("rolled_back", "1", "2")
    assert refused == {"error": "no rollout of 'm' in progress to promote (last: rolled_back)"}
    promote = [e for e in RolloutStore(tmp_path, "m").history() if e["decision"] == "promote"][0]
    assert (
        "alias 'champion' NOT moved" in promote["reason"]
    )  # no registry at that URI: said, not hidden


def test_only_intervals_with_every_gate_passing_count_towards_the_bake(tmp_path):
    async def tick_after(ctl, seconds: float, requests: int) -> str:
        await _report(ctl, {"1": "ready", "2": "ready"}, requests=requests)
        ctl._last_tick = time.monotonic() - seconds  # the interval that just ended lasted `seconds`
        await ctl._tick()
        return ctl.last_decision["decision"]

    async def scenario():
        ctl = RolloutController(str(tmp_path), "m")
        record = _record(gates=["error_rate<0.1"])
        record["bake_s"] = 1.5
        await ctl.start(record, "user")
        await tick_after(ctl, 1.0, 0)  # preparing -> step 0
        return [await tick_after(ctl, 1.0, n) for n in (10, 0, 0, 10)], ctl.record

    decisions, record = asyncio.run(scenario())
    assert decisions == [
        "continue",
        "hold",
        "hold",
        "advance",
    ]  # 1 s passing + 2 s without data + 1 s passing
    assert (record.weight, record.baked_s) == (100.0, 0.0)


def test_a_replica_loads_the_versions_its_table_names_and_drops_a_finished_candidate():
    loaded, dropped = [], []

    async def load(version, uri):
        loaded.append((version, uri))

    async def scenario():
        from kiln.rollout.core.replica import RolloutAgent, no_quality_signals

        agent = RolloutAgent("m", "1", ["1"], load, no_quality_signals, dropped.append)
        agent.apply(
            RoutingTable(stable="1", candidate="2", weight=100.0, versions={"1": "u1", "2": "u2"})
        )
        assert agent.route({}) == "1"  # v2 not loaded yet: the stable version answers
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        chosen = agent.route({})
        agent.apply(RoutingTable(stable="1", versions={"1": "u1"}))  # rolled back
        return chosen, agent.route({}), dict(agent.ready)

    chosen, after, ready = asyncio.run(scenario())
    assert (loaded, chosen, after, ready, dropped) == (
        [("2", "u2")],
        "2",
        "1",
        {"1": "ready"},
        ["2"],
    )


def test_serve_start_naming_a_newer_version_supersedes_the_promoted_one(tmp_path):
    """A restart on the same config comes back on the promoted version (tests/test_rollout.py); a
    start that names a newer registry version is the user's explicit choice: it serves that one, and
    the record and audit log say the promoted one was superseded."""
    from kiln.rollout.control.api import restore_rollouts
    from kiln.serve.config import BatchingConfig, DeploymentConfig, ServeConfig
    from kiln.serve.plan import ModelPlan, ServePlan, VersionSource

    store = RolloutStore(tmp_path, "digits")
    store.save(
        RolloutRecord(
            model="digits",
            registered_name="digits",
            tracking_uri="sqlite:///x.db",
            stable="2",
            stable_uri="models:/digits/2",
            phase="promoted",
            previous="1",
            previous_uri="models:/digits/1",
        )
    )
    model = ModelPlan(
        name="digits",
        versions=[VersionSource("3", "models:/digits/3")],
        default_version="3",
        deployment=DeploymentConfig(),
        batching=BatchingConfig(),
    )
    plan = restore_rollouts(ServePlan([model], "sqlite:///x.db", ServeConfig()), tmp_path)
    assert ([v.version for v in plan.models[0].versions], plan.models[0].default_version) == (
        ["3"],
        "3",
    )
    record = store.load()
    assert (record.stable, record.stable_uri, record.phase, record.previous) == (
        "3",
        "models:/digits/3",
        "idle",
        None,
    )
    last = store.history()[-1]
    assert (last["decision"], last["trigger"], last["weights"]) == (
        "supersede",
        "serve-start",
        {"3": 100.0},
    )
    assert "newer than the last promoted v2" in last["reason"]


@pytest.mark.parametrize(
    "content", ['{"model": "m", "stable": "1", "stable_u', "", "[1, 2]", '{"model": "m"}']
)
def test_an_unreadable_rollout_record_is_reported_not_ignored(tmp_path, content):
    """A truncated or corrupted record stops `kiln serve start` (its restore hook) with one line
    naming the file and the way out, instead of loading as "no record"."""
    from kiln.errors import KilnError
    from kiln.rollout.control.api import served_version_overrides

    store = RolloutStore(tmp_path, "m")
    store.save(RolloutRecord.from_dict(_record()))
    store.record_path.write_text(content)
    with pytest.raises(KilnError) as err:
        served_version_overrides(tmp_path, "m")
    message = str(err.value)
    assert str(store.record_path) in message and "move it aside" in message
    assert "\n" not in message


def test_the_rollout_record_is_written_atomically(tmp_path):
    store = RolloutStore(tmp_path, "m")
    store.save(RolloutRecord.from_dict(_record()))
    assert store.load().candidate == "2"
    assert [p.name for p in store.dir.iterdir()] == [store.record_path.name]  # no temporary left


def test_a_killed_process_leaves_its_requests_in_flight_on_disk(tmp_path):
    """The in-flight file outlives its process: SIGKILL it mid-request and the counts remain."""
    import os
    import signal
    import subprocess
    import sys

    from kiln.rollout.core.inflight import journal_path, read_journal

    path = journal_path(tmp_path, "m", "replica-a")
    code = (
        "import sys, pathlib\n"
        "from kiln.rollout.core.inflight import InflightJournal\n"
        "j = InflightJournal(pathlib.Path(sys.argv[1]))\n"
        "for v in ('1', '2', '2', '2', '1'): j.begin(v)\n"
        "j.end('1'); j.end('2'); j.end('1')\n"  # v1: 0 left, v2: 2 left
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    os.kill(proc.pid, signal.SIGKILL)  # the process this test started, by its pid
    proc.wait(timeout=30)
    assert read_journal(path) == {"2": 2}
    assert read_journal(tmp_path / "missing.bin") == {}


def _dead(cause: str = "WORKER_DIED: the worker process was killed", intended: bool = False):
    from kiln.rollout.core.actors import ActorFate

    return lambda rid: ActorFate(alive=False, cause=cause, intended=intended)


def test_a_dead_replicas_requests_in_flight_fail_the_candidates_gate_and_are_audited(tmp_path):
    """Errors a client saw outside any replica (its replica died) count in that version's
    error_rate, the restarts signal counts the death, and the audit log says what happened."""
    from kiln.rollout.core.inflight import InflightJournal, journal_path

    class Controller(RolloutController):
        fate = staticmethod(_dead())

    async def scenario():
        ctl = Controller(str(tmp_path), "m")
        await ctl.start(_record(gates=["error_rate<0.2", "restarts<5"]), "user")
        await _report(ctl, {"1": "ready", "2": "ready"})
        await ctl._tick()
        assert (ctl.record.phase, ctl.record.weight) == ("running", 50.0)
        journal = InflightJournal(journal_path(tmp_path, "m", "r1"))
        for version in ("2", "2", "2", "1"):
            journal.begin(version)  # what r1 was answering when it died
        await _report(ctl, {"1": "ready", "2": "ready"}, requests=10)  # 10 good answers of v2
        ctl.replicas["r1"]["seen"] -= 60  # r1 stopped reporting long ago
        await ctl._tick()
        return ctl

    ctl = asyncio.run(scenario())
    gates = ctl.last_decision["gates"]
    assert gates["error_rate<0.2"] == {"value": 3 / 13, "ok": False}
    assert gates["restarts<5"] == {"value": 1.0, "ok": True}
    assert ctl.record.phase == "rolled_back" and ctl.record.restarts == {"1": 1, "2": 1}
    lost = [e for e in RolloutStore(tmp_path, "m").history() if e["decision"] == "replica_lost"]
    assert len(lost) == 1 and lost[0]["trigger"] == "fault"
    assert lost[0]["in_flight"] == {"1": 1, "2": 3} and "WORKER_DIED" in lost[0]["reason"]
    assert not journal_path(tmp_path, "m", "r1").exists()  # read once


def test_a_replica_serve_stopped_with_nothing_in_flight_is_no_fault(tmp_path):
    class Controller(RolloutController):
        fate = staticmethod(_dead("RAY_KILL", intended=True))

    async def scenario():
        ctl = Controller(str(tmp_path), "m")
        await ctl.start(_record(gates=["error_rate<0.2"]), "user")
        await _report(ctl, {"1": "ready", "2": "ready"})
        ctl.replicas["r1"]["seen"] -= 60
        await ctl._tick()
        return ctl

    ctl = asyncio.run(scenario())
    assert "r1" not in ctl.replicas and ctl.record.restarts == {}
    decisions = [e["decision"] for e in RolloutStore(tmp_path, "m").history()]
    assert "replica_lost" not in decisions


def test_a_restart_of_serves_controller_during_a_rollout_is_audited_once(tmp_path):
    """Its process id changes (with no answer in between, while it was dead): one ``restart``
    entry, trigger fault, naming both processes; the rollout goes on."""
    from kiln.rollout.control import controller as control

    pids: list[int | None] = [101, 101, None, None, 202, 202]

    class Controller(RolloutController):
        serve_pid = staticmethod(lambda: pids.pop(0))

    async def scenario():
        ctl = Controller(str(tmp_path), "m")
        ctl.watch_serve = True
        await ctl.start(_record(gates=["error_rate<0.2"]), "user")
        await _report(ctl, {"1": "ready", "2": "ready"})
        for _ in range(6):
            ctl._serve = (ctl._serve[0], ctl._serve[1] - control.SERVE_WATCH_S)  # due again
            await ctl._tick()
        return ctl

    ctl = asyncio.run(scenario())
    assert pids == []  # asked at every due tick
    restarts = [e for e in RolloutStore(tmp_path, "m").history() if e["decision"] == "restart"]
    assert len(restarts) == 1, restarts
    entry = restarts[0]
    assert entry["trigger"] == "fault" and entry["fault"] == "serve_controller_restart"
    assert (entry["previous_pid"], entry["pid"]) == (101, 202)
    assert ctl.record.active


def test_a_retry_storm_at_the_ingress_during_a_rollout_is_audited_once_per_storm(tmp_path):
    """The ingress's counters read every interval: the first reading is the baseline; an interval
    whose retries reach the storm's floor is one ``retry_storm`` entry (trigger fault, with the
    counts), the next stormy interval is the same storm, a calm one ends it, and a reload of
    HAProxy (counters from zero) is read as new counts; a few retries are no storm."""
    from kiln.rollout.control import controller as control
    from kiln.serve.ingress_stats import IngressCounters

    floor = control.RETRY_STORM_MIN
    readings: list[IngressCounters | None] = [
        IngressCounters(requests=1000, retries=40),  # baseline: retries from before the rollout
        IngressCounters(requests=1100, retries=40 + floor - 1),  # a few: no storm
        IngressCounters(requests=1200, retries=40 + floor - 1 + floor, redispatches=3),  # storm
        IngressCounters(requests=1300, retries=60 + floor, redispatches=9),  # the same storm
        None,  # HAProxy unreadable this interval
        IngressCounters(requests=1400, retries=60 + floor, redispatches=9),  # calm: storm over
        IngressCounters(requests=50, retries=floor, errors_5xx=2),  # reloaded: a new storm
    ]

    class Controller(RolloutController):
        def ingress_counters(self):
            return readings.pop(0)

    async def scenario():
        ctl = Controller(str(tmp_path), "m")
        ctl.watch_serve = True
        ctl.serve_pid = lambda: 7  # type: ignore[method-assign]
        await ctl.start(_record(gates=["error_rate<0.2"]), "user")
        await _report(ctl, {"1": "ready", "2": "ready"})
        for _ in range(7):
            await ctl._tick()
        return ctl

    ctl = asyncio.run(scenario())
    assert readings == []
    storms = [e for e in RolloutStore(tmp_path, "m").history() if e["decision"] == "retry_storm"]
    assert [(e["retries"], e["requests"], e["redispatches"]) for e in storms] == [
        (floor, 100, 3),
        (floor, 50, 0),
    ], storms
    assert all(e["trigger"] == "fault" and e["fault"] == "retry_storm" for e in storms)
    assert storms[1]["errors_5xx"] == 2 and "sent 5 of 50 requests again" in storms[1]["reason"]
    assert ctl.record.active  # an audit entry, not a decision


def test_record_and_routing_never_disagree_during_a_promotion(tmp_path):
    """The alias move takes seconds: during it, the table replicas get and the record on disk
    both still say the rollout runs; after it, both say promoted, in the same revision."""
    seen = {}

    class Controller(RolloutController):
        async def _move_champion(self, version: str) -> str:
            seen["table"] = self.table()
            seen["on_disk"] = RolloutStore(tmp_path, "m").load()
            return ""

    async def scenario():
        ctl = Controller(str(tmp_path), "m")
        await ctl.start(_record(gates=[]), "user")
        await _report(ctl, {"1": "ready", "2": "ready"})
        await ctl._tick()
        await ctl.command("promote")
        return ctl

    ctl = asyncio.run(scenario())
    assert (seen["table"]["stable"], seen["table"]["candidate"]) == ("1", "2")
    assert (seen["on_disk"].phase, seen["on_disk"].stable) == ("running", "1")
    assert seen["on_disk"].revision == seen["table"]["revision"]
    after = RolloutStore(tmp_path, "m").load()
    assert (after.phase, after.stable) == ("promoted", "2") and ctl.table()["stable"] == "2"
    assert after.revision == ctl.table()["revision"]


def test_a_saved_phase_always_finds_its_reason_in_the_audit_log(tmp_path):
    """Whoever reads a new phase from the record (``kiln rollout status``, a test polling it) finds
    the decision that set it already in the audit log: the entry is written before the record."""
    seen: list[tuple[str, str | None]] = []

    class Store(RolloutStore):
        def save(self, record):
            history = self.history()
            seen.append((record.phase, history[-1]["phase"] if history else None))
            super().save(record)

    async def scenario():
        ctl = RolloutController(str(tmp_path), "m")
        ctl.store = Store(tmp_path, "m")
        await ctl.start(_record(gates=["error_rate<0.1"]), "user")
        await _report(ctl, {"1": "ready", "2": "ready"})
        await ctl._tick()  # step 0
        await _report(ctl, {"1": "ready", "2": "ready"}, requests=20, errors=10)
        await ctl._tick()  # rolled back by its gate
        return ctl

    ctl = asyncio.run(scenario())
    assert ctl.record.phase == "rolled_back"
    phases = [phase for phase, _ in seen]
    assert phases[0] == "preparing" and phases[-1] == "rolled_back" and "running" in phases
    assert all(record == logged for record, logged in seen), seen
