"""bench/chaos.py's figures from a load's answers, on made-up timelines (no Ray, no serving): the
time to full throughput, the failures by kind and the rollout state a fault took. The suite itself
runs with `make chaos` (CI: `--bounded`)."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

from chaos import count_failures, rollout_state_lost, time_to_full  # noqa: E402


def steady(t0: float, t1: float, per_s: int, status: int = 200) -> list[tuple[float, int, str]]:
    """Answers at ``per_s`` a second, evenly spread over [t0, t1)."""
    n = int((t1 - t0) * per_s)
    return [(t0 + i / per_s, status, "") for i in range(n)]


def test_full_throughput_is_the_first_window_back_at_90_percent_of_the_rate_before():
    # 100/s until the fault at t=10, nothing for 4 s, 50/s for 3 s, then 100/s again
    answers = steady(0, 10, 100) + steady(14, 17, 50) + steady(17, 40, 100)
    back, lowest = time_to_full(answers, fault_at=10.0, rate_before=100.0, until=40.0)
    assert 6.5 <= back <= 7.0  # a 3 s window starting at 17 holds only full-rate answers
    assert lowest == 0.0


def test_throughput_that_never_dropped_is_full_at_once_and_one_never_back_is_none():
    answers = steady(0, 30, 100)
    assert time_to_full(answers, 10.0, 100.0, 30.0)[0] == 0.0
    stalled = steady(0, 10, 100) + steady(10, 30, 50)
    back, lowest = time_to_full(stalled, 10.0, 100.0, 30.0)
    assert back is None and lowest == 50.0


def test_failures_are_counted_by_kind_inside_the_window_only():
    answers = [
        (1.0, 503, ""),
        (5.0, 0, "ConnectionError"),
        (5.5, 0, "ConnectionError"),
        (6.0, 500, ""),
        (6.5, 200, ""),
        (20.0, 503, ""),
    ]
    assert count_failures(answers, 2.0, 10.0) == {"ConnectionError": 2, "HTTP 500": 1}


def test_rollout_state_lost_names_record_changes_bake_time_going_back_and_lost_audit_entries():
    before = {"phase": "running", "candidate": "2", "step": 0, "weight": 30.0, "baked_s": 12.0}
    later = dict(before, baked_s=20.0)
    assert rollout_state_lost(before, later, 10, 14) == []
    reset = dict(before, phase="rolled_back", baked_s=3.0)
    lost = rollout_state_lost(before, reset, 10, 8)
    assert lost == [
        "record phase: running -> rolled_back",
        "bake time 12.0 s -> 3.0 s",
        "audit entries 10 -> 8",
    ]
