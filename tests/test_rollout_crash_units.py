"""A candidate whose process dies, without a cluster: the replica's agent takes it out of routing
and reports the death at once; the controller audits it and rolls the rollout back."""

from __future__ import annotations

import asyncio

from kiln.rollout.control.controller import RolloutController
from kiln.rollout.core.routing import RoutingTable
from kiln.rollout.core.store import RolloutStore
from test_rollout_units import _record

GATES = ["p99_ms<1000"]  # no gate on errors: the death alone rolls the candidate back
TABLE = RoutingTable(stable="1", candidate="2", weight=100.0, versions={"1": "u1", "2": "u2"})


def test_a_replica_stops_routing_to_a_version_whose_process_died_and_reports_it_once():
    async def load(version, uri):
        pass

    async def scenario():
        from kiln.rollout.core.replica import RolloutAgent, no_quality_signals

        agent = RolloutAgent("m", "1", ["1"], load, no_quality_signals)
        agent._wake = asyncio.Event()
        agent.lost("1", "its process killed by SIGABRT")  # a version of the deployment: not ours
        agent.apply(TABLE)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        before = agent.route({})
        agent.lost("2", "models:/m/2: its process killed by SIGABRT")
        agent.lost("2", "a second request saw it too")  # once per death
        return before, agent

    before, agent = asyncio.run(scenario())
    assert before == "2" and agent.route({}) == "1" and agent.mirror_to("1") is None
    assert agent.ready == {"1": "ready", "2": "crashed: models:/m/2: its process killed by SIGABRT"}
    assert list(agent._lost) == ["2"] and "SIGABRT" in agent._lost["2"]["cause"]
    assert agent._wake.is_set()  # reported now, not at the next period
    agent.apply(RoutingTable(stable="1", versions={"1": "u1"}))  # rolled back: unloaded
    assert agent.ready == {"1": "ready"}


def test_the_candidates_process_death_rolls_back_at_once_with_an_audit_entry(tmp_path):
    async def scenario():
        ctl = RolloutController(str(tmp_path), "m")
        await ctl.start(_record(gates=GATES), "user")
        await ctl.report({"replica": "r1", "ready": {"1": "ready", "2": "ready"}, "stats": {}})
        await ctl._tick()
        assert (ctl.record.phase, ctl.record.weight) == ("running", 50.0)
        death = {"cause": "models:/m/2: its process killed by SIGABRT", "at": 1234.5}
        table = await ctl.report(
            {"replica": "r1", "ready": {"1": "ready", "2": "crashed"}, "lost": {"2": death}}
        )
        return ctl, table

    ctl, table = asyncio.run(scenario())
    assert ctl.record.phase == "rolled_back" and ctl.record.restarts == {"2": 1}
    assert (table["candidate"], table["versions"]) == (None, {"1": "models:/m/1"})
    entries = RolloutStore(tmp_path, "m").history()
    assert [e["decision"] for e in entries] == ["start", "step", "version_lost", "rollback"]
    lost, rollback = entries[-2:]
    assert (lost["trigger"], lost["fault"], lost["crashed_at"]) == (
        "fault",
        "version_process_death",
        1234.5,
    )
    assert rollback["trigger"] == "fault" and "SIGABRT" in rollback["reason"]
    assert rollback["weights"] == {"1": 100.0}


def test_a_finished_rollouts_version_dying_is_audited_without_a_decision(tmp_path):
    async def scenario():
        ctl = RolloutController(str(tmp_path), "m")
        await ctl.start(_record(gates=GATES), "user")
        await ctl.command("rollback")
        await ctl.report(
            {"replica": "r1", "ready": {}, "lost": {"2": {"cause": "exited with 1", "at": 1.0}}}
        )
        return ctl

    ctl = asyncio.run(scenario())
    entries = RolloutStore(tmp_path, "m").history()
    assert [e["decision"] for e in entries] == ["start", "rollback", "version_lost"]
    assert ctl.record.restarts == {}
