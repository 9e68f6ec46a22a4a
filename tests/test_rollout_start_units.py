"""`kiln rollout start`'s quick path, without a cluster: the user's mistakes the run dir shows are
refused before Ray is touched (or imported), and `status --watch` shows the candidate's loading per
replica."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import kiln_env

# Refused from the run dir alone, in a fresh process; Ray must not have been imported by then
# (the address is unreachable: a connection attempt would fail differently, after seconds).
CHECK = """
import sys
from kiln.errors import KilnError
from kiln.rollout.control.api import start_rollout
from kiln.rollout.core.spec import RolloutOptions
from kiln.serve.instance import ServeState, save_state

run_dir = sys.argv[1]
save_state(run_dir, ServeState(
    address="127.0.0.1:1", url="http://127.0.0.1:1", ingress="haproxy",
    models=[{"name": "digits", "version": "1", "uri": "models:/digits/1", "default": True}],
    tracking_uri="sqlite:////nonexistent/mlflow.db",
))
for model, to, gates in (("iris", "2", []), ("digits", "1", []), ("digits", "2", ["p99<1"])):
    try:
        options = RolloutOptions(gates=gates or ["error_rate<0.01"])
        start_rollout(run_dir, None, model, to, "canary", options)
    except KilnError as exc:
        print(exc)
print("ray imported:", "ray" in sys.modules)
"""


def test_mistakes_the_run_dir_shows_are_refused_before_ray_is_imported(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, str(tmp_path)],
        env=kiln_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"model 'iris' is not served from {tmp_path} (served: digits)",
        "v1 is already the stable version of 'digits'",
        "gate 'p99<1': unknown signal 'p99' (known: error_rate, p50_ms, p99_ms, agreement, "
        "restarts, drift, ood_rate)",
        "ray imported: False",
    ]


@pytest.mark.parametrize(
    "replicas, line",
    [
        ({"r1": {"1": "ready", "2": "ready"}, "r2": {"1": "ready"}}, "1/2 ready, 1 loading"),
        (
            {"r1": {"1": "ready", "2": "failed: ModelError: not an allowed builder"}},
            "0/1 ready; failed: ModelError: not an allowed builder",
        ),
    ],
)
def test_status_shows_the_candidate_loading_per_replica(replicas, line):
    from kiln.commands.rollout import render_status
    from kiln.rollout.control.api import RolloutStatus

    record = {
        "model": "digits",
        "phase": "preparing",
        "stable": "1",
        "candidate": "2",
        "strategy": "canary",
        "steps": [5.0],
        "step": -1,
        "weight": 0.0,
        "bake_s": 60.0,
        "baked_s": 0.0,
    }
    status = RolloutStatus(record, {}, {}, {}, replicas, live=True)
    assert f"  v2 on replicas: {line}" in render_status(status).splitlines()
