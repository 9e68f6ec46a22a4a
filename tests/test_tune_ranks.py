"""Multi-worker trials (``tune.trial_workers`` > 1 on CPUs): the trial's process is rank 0 and
starts its other ranks as Ray actors (``kiln.tune.ranks``), against the session's real Ray instance
(2 CPUs) and a real MLflow sqlite store: every rank trains every epoch, no Ray Train run is started,
the peers end with their trial, and a killed peer costs its trial one attempt, not the sweep."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import yaml

from kiln import tracking as trk
from kiln.schema import validate_config
from kiln.tune.results import COMPLETED
from kiln.waiting import wait_until
from ray_actors import alive_actors, all_actors, tasks_named
from sweeps import epochs_logged, write_config

pytestmark = pytest.mark.module_seconds(90)

PEER = "TrialPeer"
LR = {"train.lr": {"loguniform": [1.0e-3, 1.0e-2]}}


def _peer_tasks(address: str) -> list:
    return tasks_named(address, f"{PEER}.train")


def _ended_tasks(address: str, before: set[str], count: int) -> list | None:
    """The peer tasks not in ``before`` once there are ``count`` and all have ended, else None."""
    tasks = [t for t in _peer_tasks(address) if t.task_id not in before]
    if len(tasks) >= count and all(t.state in ("FINISHED", "FAILED") for t in tasks):
        return tasks
    return None


def _class_count(address: str, class_name: str) -> int:
    return sum(a.class_name == class_name for a in all_actors(address))


def _alive_peers(address: str) -> list:
    return [a for a in alive_actors(address) if a.class_name == PEER]


def _reported_epochs(runs: Path) -> int:
    """Reports written so far by the sweep's trials (Tune's result.json, one line per report)."""
    return sum(
        len(path.read_text().splitlines()) for path in runs.glob("sweeps/*/tune/*/result.json")
    )


@pytest.fixture(scope="module")
def ranked_sweep(ray_cluster, tmp_path_factory):
    """A sweep of two 2-rank trials, one at a time: (its SweepResult, the TrialPeer.train tasks it
    ran, the number of Ray Train controllers it started)."""
    from kiln.tune.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("ranks")
    peers_before = {t.task_id for t in _peer_tasks(ray_cluster)}
    controllers_before = _class_count(ray_cluster, "TrainController")
    config = write_config(
        tmp / "ranks.yaml",
        tmp / "runs",
        "tune-ranks",
        num_samples=2,
        max_concurrent_trials=1,  # the second trial reuses the first one's process (rank 0)
        asha=None,
        max_epochs=2,
        trial_workers=2,
        cpus_per_worker=0.5,
        space=LR,
    )
    result = run_sweep(validate_config(yaml.safe_load(config.read_text())), address=ray_cluster)
    # counted now: the module's other tests start peers and Ray Train runs of their own. Ray's
    # state API learns of a task's end from events its worker sends: wait until both have ended.
    peers = wait_until(
        lambda: _ended_tasks(ray_cluster, peers_before, 2),
        timeout=60,
        what="the sweep's two peer tasks to be recorded as ended",
    )
    controllers = _class_count(ray_cluster, "TrainController") - controllers_before
    return result, peers, controllers


@pytest.mark.slow
def test_trial_workers_train_each_trial_on_that_many_ranks_without_ray_train(
    ranked_sweep, ray_cluster
):
    result, peers, new_controllers = ranked_sweep
    assert [t.status for t in result.trials] == [COMPLETED, COMPLETED]
    # Each trial's second rank was a peer actor whose loop ran every epoch to its end: DDP steps
    # are collectives, so it did not finish unless rank 0 took the same steps with it.
    assert sorted(t.state for t in peers) == ["FINISHED", "FINISHED"], peers
    assert new_controllers == 0  # no Ray Train run
    wait_until(lambda: not _alive_peers(ray_cluster), timeout=30, what="the peers to end")
    sweep_dir = Path(result.sweep_dir)
    for t in result.trials:
        assert t.checkpoint and Path(t.checkpoint).is_relative_to(sweep_dir)  # Tune's own folder
        assert epochs_logged(result.tracking_uri, t.run_id) == [0, 1]
        assert 0.0 < t.metrics["val_accuracy"] <= 1.0
    assert trk.model_version_for(result.tracking_uri, result.model_uri).run_id == result.best.run_id


@pytest.mark.slow
def test_best_yaml_of_a_two_rank_trial_trains_to_its_metric_on_two_ray_train_workers(
    ranked_sweep, ray_cluster
):
    """`kiln train best.yaml` runs Ray Train with the trial's 2 workers: the same DDP steps on the
    same shards (Ray Data's equal streaming split of the same cached split), so the same model."""
    from kiln.schema import load_config
    from kiln.train.run import run_training

    result, _, _ = ranked_sweep
    best_yaml = Path(result.best_config_path)
    assert yaml.safe_load(best_yaml.read_text())["train"]["workers"] == 2
    trained = run_training(load_config(best_yaml), address=ray_cluster).metrics
    assert trained["val_loss"] == pytest.approx(result.best.metrics["val_loss"], rel=1e-6)
    assert trained["val_accuracy"] == pytest.approx(result.best.metrics["val_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_a_killed_peer_costs_its_trial_one_attempt_and_the_trial_resumes_from_its_checkpoint(
    ray_cluster, tmp_path
):
    from kiln.tune.sweep import run_sweep

    epochs = 20
    runs = tmp_path / "runs"
    config = write_config(
        tmp_path / "kill.yaml",
        runs,
        "tune-ranks-kill",
        num_samples=1,
        asha=None,
        max_epochs=epochs,
        trial_workers=2,
        cpus_per_worker=0.5,
        trial_max_failures=1,
        space=LR,
    )
    peers_before = {a.actor_id for a in all_actors(ray_cluster) if a.class_name == PEER}
    tasks_before = {t.task_id for t in _peer_tasks(ray_cluster)}
    killed: dict[str, int] = {}

    def kill_the_peer_after_the_first_report() -> None:
        wait_until(lambda: _reported_epochs(runs) >= 1, timeout=300, what="the first report")
        peer = wait_until(lambda: _alive_peers(ray_cluster), timeout=60, what="a live peer")[0]
        os.kill(peer.pid, signal.SIGKILL)
        killed["pid"] = peer.pid
        killed["epochs_reported"] = _reported_epochs(runs)

    killer = threading.Thread(target=kill_the_peer_after_the_first_report, daemon=True)
    killer.start()
    result = run_sweep(validate_config(yaml.safe_load(config.read_text())), address=ray_cluster)
    killer.join(timeout=10)

    assert killed, "the peer was never killed"
    assert killed["epochs_reported"] < epochs, "the trial ended before its peer was killed"
    (trial,) = result.trials
    assert trial.status == COMPLETED
    # Two peers: the one killed and the one the restarted attempt started.
    peers = [a for a in all_actors(ray_cluster) if a.class_name == PEER]
    assert len([a for a in peers if a.actor_id not in peers_before]) == 2
    # The restarted attempt went on from the last checkpoint: every epoch is in the history and
    # the last one reported is the trial's last.
    assert sorted(set(epochs_logged(result.tracking_uri, trial.run_id))) == list(range(epochs))
    assert trial.epochs == epochs
    reports = [
        json.loads(line)
        for path in runs.glob("sweeps/*/tune/*/result.json")
        for line in path.read_text().splitlines()
    ]
    # Resumed, not restarted from scratch: epoch 0 was reported once.
    assert [r["epoch"] for r in reports].count(0) == 1
    wait_until(lambda: not _alive_peers(ray_cluster), timeout=30, what="the peers to end")
    # and their tasks recorded as ended, so the module's other tests count only their own
    wait_until(
        lambda: _ended_tasks(ray_cluster, tasks_before, 2),
        timeout=60,
        what="the killed peer's and its successor's tasks to be recorded as ended",
    )
