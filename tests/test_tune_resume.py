"""kiln tune, resumed after its driver is killed (a two-objective sweep), and a sweep that cannot
be placed: against the session's real Ray
instance (2 CPUs) and a real MLflow sqlite store (split from test_tune_sweep.py to balance the
xdist workers).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, kiln_env, last_json, run_kiln
from kiln import tracking as trk
from kiln.errors import ResourceError
from kiln.schema import validate_config
from kiln.tune.results import COMPLETED, dominates
from kiln.waiting import wait_until
from sweeps import child_runs, epochs_logged, write_config

pytestmark = pytest.mark.module_seconds(140)


def _saved_as_ended(runs_dir: Path) -> set[int]:
    """Trial numbers that Ray Tune's saved sweep state lists as ended (what a resume will not run
    again)."""
    from ray.tune import ExperimentAnalysis

    from kiln.tune.trial import trial_number

    for tune_dir in runs_dir.glob("sweeps/*/tune"):
        try:
            trials = ExperimentAnalysis(str(tune_dir)).trials
        except (OSError, ValueError, KeyError):  # not saved yet (ValueError), or being written
            return set()
        return {trial_number(t.experiment_tag) for t in trials if t.status == "TERMINATED"}
    return set()


@pytest.fixture(scope="module")
def resumed_sweep(ray_cluster, tmp_path_factory):
    """A two-objective sweep whose driver is killed mid-sweep, then resumed: (--json result, trials
    ended before the kill)."""
    tmp = tmp_path_factory.mktemp("resume")
    # One trial at a time, so that most of the sweep is still ahead when the driver is killed.
    config = write_config(
        tmp / "resume.yaml",
        tmp / "runs",
        "tune-resume",
        num_samples=6,
        max_concurrent_trials=1,
        asha=None,
        space={"train.lr": {"loguniform": [1.0e-3, 3.0e-2]}, "model.width": {"int": [8, 32]}},
        objectives=[{"metric": "val_accuracy", "mode": "max"}, {"metric": "params", "mode": "min"}],
    )
    log = tmp / "first.log"
    with open(log, "w") as fh:
        driver = subprocess.Popen(
            [sys.executable, "-m", "kiln.cli", "tune", str(config), "--address", ray_cluster],
            cwd=REPO,
            # Tune's state saved every 2 s, as the CLI entry sets it (Tune's default is >= 10 s).
            env=kiln_env({"TUNE_GLOBAL_CHECKPOINT_S": "2"}),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:

        def two_saved_as_ended() -> set[int] | None:
            assert driver.poll() is None, log.read_text()[-3000:]  # still sweeping
            ended = _saved_as_ended(tmp / "runs")
            return ended if len(ended) >= 2 else None

        # Polled at a steady 0.2 s: the kill should land while most of the sweep is ahead.
        ended_before = wait_until(
            two_saved_as_ended, 400, "two trials saved as ended", interval=0.2, max_interval=0.2
        )
        driver.kill()  # SIGKILL: no chance to save anything more
        driver.wait(timeout=30)
        assert driver.returncode == -signal.SIGKILL, log.read_text()[-3000:]  # killed, not finished
        assert 2 <= len(ended_before) < 6
    finally:
        if driver.poll() is None:
            driver.kill()
    proc = run_kiln(
        "tune", str(config), "--address", ray_cluster, "--resume", "--json", timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr
    return last_json(proc.stdout), ended_before


@pytest.mark.slow
def test_resume_after_killing_the_driver_skips_finished_trials(resumed_sweep):
    out, ended_before = resumed_sweep
    assert out["resumed"] and out["trials"] == 6
    assert out["kept_from_before"] >= len(ended_before)
    assert {t["status"] for t in out["trial_results"]} == {COMPLETED}, [
        t for t in out["trial_results"] if t["status"] != COMPLETED
    ]
    uri = out["tracking_uri"]
    children = child_runs(uri, out["sweep_run_id"])
    assert sorted(children) == list(range(1, 7))
    attempts = {
        n: [m.value for m in trk.metric_history(uri, r.info.run_id, "trial_attempt")]
        for n, r in children.items()
    }
    for number in ended_before:
        assert attempts[number] == [1.0], (
            f"trial {number} ended before the kill but ran again: {attempts}"
        )
    for number, run in children.items():
        assert epochs_logged(uri, run.info.run_id) == [0, 1, 2], (
            f"trial {number}: each epoch logged once"
        )
    sweep_state = json.loads((Path(out["sweep_dir"]) / "sweep.json").read_text())
    assert sweep_state["status"] == "finished"  # so a later --resume refuses it (test_tune_space)


@pytest.mark.slow
def test_multi_objective_sweep_returns_a_pareto_front(resumed_sweep):
    out, _ = resumed_sweep
    modes = [o["mode"] for o in out["objectives"]]
    values = {
        t["trial"]: [t["metrics"]["val_accuracy"], t["metrics"]["params"]]
        for t in out["trial_results"]
    }
    front = [m["trial"] for m in out["front"]]
    assert front and out["best_trial"] == front[0]
    for a in front:
        for b in front:
            assert not dominates(values[a], values[b], modes)
    for number, vals in values.items():
        if number not in front:  # everything left out is beaten (or tied) by a front member
            assert any(dominates(values[m], vals, modes) or values[m] == vals for m in front), (
                number
            )
    assert [list(m["values"].values()) for m in out["front"]] == [values[m] for m in front]
    uri = out["tracking_uri"]
    for number, run in child_runs(uri, out["sweep_run_id"]).items():
        assert run.data.tags["kiln.tune.pareto"] == str(number in front).lower()
    for member in out["front"]:
        version = trk.model_version_for(uri, member["model_uri"])
        assert version.tags["kiln.tune.pareto"] == "true" and version.tags[
            "kiln.tune.trial"
        ] == str(member["trial"])
        assert (Path(out["sweep_dir"]) / "front" / f"trial_{member['trial']:04d}.yaml").is_file()
    assert (Path(out["sweep_dir"]) / "plots" / "pareto_front.png").is_file()


def test_unplaceable_trials_fail_at_once(ray_cluster, tmp_path):
    config = write_config(tmp_path / "big.yaml", tmp_path / "runs", "tune-big")
    # run_kiln's timeout fails the test if the sweep waits for resources instead of failing
    proc = run_kiln(
        "tune", str(config), "tune.cpus_per_worker=3", "--address", ray_cluster, timeout=300
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: tune.trial_workers=1 needs 1 x (3 CPU) but the cluster can place only 0 (it has 2 "
        "CPU in all); "
        "lower tune.trial_workers or the per-worker resources"
    ]
    assert not (tmp_path / "runs" / "sweeps").exists()  # nothing half-written

    from kiln.tune.sweep import run_sweep

    cfg = validate_config(yaml.safe_load(config.read_text()))
    cfg.tune.trial_workers = 5
    with pytest.raises(
        ResourceError,
        match=r"tune.trial_workers=5 needs 5 x \(0.5 CPU\) but the cluster can place only 4",
    ):
        run_sweep(cfg, address=ray_cluster)
