"""kiln tune end to end, against the module's real Ray instance (2 CPUs) and a real MLflow sqlite
store.

Sweeps are tiny (digits, a small CNN, 2-3 epochs, trials at 0.5 CPU), but real: Optuna's TPE
through Ray Tune's OptunaSearch, ASHA, per-trial MLflow child runs, the registry.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, kiln_env, last_json, run_kiln
from kiln import tracking as trk
from kiln.errors import ResourceError
from kiln.schema import load_config, validate_config
from kiln.train.run import run_training
from kiln.tune.results import COMPLETED, STOPPED_EARLY, dominates
from kiln.waiting import wait_until

SPACE = {"train.lr": {"loguniform": [1.0e-4, 5.0e-2]}, "model.width": {"int": [4, 16]}}


def write_config(path: Path, run_dir: Path, name: str, **tune) -> Path:
    data = {
        "experiment": {"name": name, "run_dir": str(run_dir)},
        "data": {"source": "digits", "image": "image"},
        "model": {"name": "cnn", "width": 8, "dropout": 0.0},
        "train": {"epochs": 3, "batch_size": 64, "lr": 0.003, "seed": 0},
        "tune": {
            "space": SPACE,
            "num_samples": 8,
            "startup_trials": 4,
            "cpus_per_worker": 0.5,
            "asha": {"grace_period": 1, "reduction_factor": 2},
            **tune,
        },
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def child_runs(tracking_uri: str, parent_run_id: str) -> dict[int, object]:
    """The sweep's MLflow child runs by trial number."""
    parent = trk.get_run(tracking_uri, parent_run_id)
    runs = trk.search_runs(
        tracking_uri, parent.info.experiment_id, f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )
    return {int(r.data.tags["kiln.tune.trial"]): r for r in runs}


def epochs_logged(tracking_uri: str, run_id: str) -> list[int]:
    return sorted(int(m.step) for m in trk.metric_history(tracking_uri, run_id, "epoch"))


@pytest.fixture(scope="module")
def sweep(ray_cluster, tmp_path_factory):
    """One real single-objective sweep through the CLI: (completed process, --json result,
    run_dir)."""
    tmp = tmp_path_factory.mktemp("sweep")
    config = write_config(tmp / "sweep.yaml", tmp / "runs", "tune-e2e")
    proc = run_kiln("tune", str(config), "--address", ray_cluster, "--json", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, last_json(proc.stdout), tmp / "runs"


@pytest.mark.slow
def test_sweep_best_trial_beats_worst_and_asha_stops_some_early(sweep):
    _, out, _ = sweep
    trials = out["trial_results"]
    assert out["trials"] == len(trials) == 8
    accuracies = [t["metrics"]["val_accuracy"] for t in trials]
    best = out["best_metrics"]["val_accuracy"]
    assert best == max(t["metrics"]["val_accuracy"] for t in trials if t["status"] == COMPLETED)
    assert (
        best > min(accuracies) + 0.05
    )  # the space holds clearly worse settings (lr 1e-4, width 4)
    stopped = [t for t in trials if t["status"] == STOPPED_EARLY]
    assert out["stopped_early"] == len(stopped) >= 1
    assert all(t["epochs"] < 3 for t in stopped)
    assert all(t["epochs"] == 3 for t in trials if t["status"] == COMPLETED)
    assert {t["status"] for t in trials} <= {COMPLETED, STOPPED_EARLY}


@pytest.mark.slow
def test_sweep_tracks_a_parent_run_with_a_child_run_per_trial(sweep):
    _, out, _ = sweep
    uri = out["tracking_uri"]
    parent = trk.get_run(uri, out["sweep_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags[trk.TAG_JOB] == "tune"
    assert parent.data.metrics["trials_stopped_early"] == out["stopped_early"]
    assert {
        "plots/optimization_history.png",
        "plots/parallel_coordinate.png",
        "plots/param_importances.png",
    } <= {a.path for a in trk.client(uri).list_artifacts(out["sweep_run_id"], "plots")}
    children = child_runs(uri, out["sweep_run_id"])
    assert sorted(children) == [t["trial"] for t in out["trial_results"]]
    for t in out["trial_results"]:
        run = children[t["trial"]]
        assert run.info.status == "FINISHED"
        assert (
            run.data.tags["kiln.tune.status"] == t["status"]
        )  # early stops are recorded on the run
        assert float(run.data.params["train.lr"]) == pytest.approx(t["params"]["train.lr"])
        assert int(run.data.params["model.width"]) == t["params"]["model.width"]
        assert epochs_logged(uri, run.info.run_id) == list(
            range(t["epochs"])
        )  # one value per epoch trained
        if t["status"] == STOPPED_EARLY:
            assert run.data.tags["kiln.tune.stopped_at_epoch"] == str(t["epochs"])
    best_run = children[out["best_trial"]]
    assert best_run.data.tags["kiln.tune.best"] == "true"
    version = trk.model_version_for(uri, out["model_uri"])
    assert version.run_id == best_run.info.run_id
    assert version.tags["kiln.tune.sweep_run_id"] == out["sweep_run_id"]


@pytest.mark.slow
def test_sweep_prints_progress_and_a_table_not_tunes_own_output(sweep):
    proc, out, _ = sweep
    err = proc.stderr
    assert re.search(r"trial\s+1 start", err) and re.search(r"trial\s+\d+ epoch 1/3", err)
    assert re.search(r"trial\s+\d+ stopped at epoch", err)
    table = [
        line for line in err.splitlines() if line.startswith("trial ") and "val_accuracy" in line
    ]
    assert table and "status" in table[0]
    assert f"{out['best_trial']} *" in err
    for tune_output in ("Trial status", "Current time:", "Number of trials", "╭"):
        assert tune_output not in err + proc.stdout
    assert (
        len([line for line in proc.stdout.splitlines() if line.strip()]) == 1
    )  # --json: stdout is the JSON line only
    sweep_dir = Path(out["sweep_dir"])
    assert {p.name for p in (sweep_dir / "plots").glob("*.png")} == {
        "optimization_history.png",
        "parallel_coordinate.png",
        "param_importances.png",
    }
    assert (sweep_dir / "best.yaml").is_file() and (sweep_dir / "results.json").is_file()


@pytest.mark.slow
def test_best_yaml_trains_to_the_best_trials_metric(sweep, ray_cluster):
    _, out, _ = sweep
    best_yaml = Path(out["best_config_path"])
    data = yaml.safe_load(best_yaml.read_text())
    assert "tune" not in data and data["train"]["workers"] == 1 and data["train"]["epochs"] == 3
    assert data["train"]["lr"] == out["best_params"]["train.lr"]
    assert data["model"]["width"] == out["best_params"]["model.width"]
    # What `kiln train best.yaml` runs (in this process, to skip a second interpreter's start-up).
    trained = run_training(load_config(best_yaml), address=ray_cluster).metrics
    # Same seed, one worker, one thread: the same arithmetic, so the same predictions.
    assert trained["val_accuracy"] == pytest.approx(out["best_metrics"]["val_accuracy"], abs=1e-9)
    assert trained["val_loss"] == pytest.approx(out["best_metrics"]["val_loss"], rel=1e-4)


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


@pytest.mark.slow
def test_trial_workers_run_each_trial_as_a_multi_worker_ray_train_run(ray_cluster, tmp_path):
    from kiln.tune.sweep import run_sweep

    config = write_config(
        tmp_path / "ddp.yaml",
        tmp_path / "runs",
        "tune-ddp",
        num_samples=1,
        asha=None,
        max_epochs=2,
        trial_workers=2,
        cpus_per_worker=0.5,
        space={"train.lr": {"loguniform": [1.0e-3, 1.0e-2]}},
    )
    cfg = validate_config(yaml.safe_load(config.read_text()))
    result = run_sweep(cfg, address=ray_cluster)
    assert [t.status for t in result.trials] == [COMPLETED]
    for t in result.trials:
        # Each trial ran a 2-worker TorchTrainer whose checkpoints live under the run folder.
        train_runs = list(
            (tmp_path / "runs" / "checkpoints").glob(
                f"kiln-{Path(result.sweep_dir).name}-{t.trial_id}"
            )
        )
        assert len(train_runs) == 1
        assert t.checkpoint and Path(t.checkpoint).is_relative_to(train_runs[0])
        assert epochs_logged(result.tracking_uri, t.run_id) == [0, 1]
        assert 0.0 < t.metrics["val_accuracy"] <= 1.0
    assert trk.model_version_for(result.tracking_uri, result.model_uri).run_id == result.best.run_id


@pytest.mark.slow
def test_the_tuned_versions_model_card_names_its_sweep_and_trial(sweep):
    from kiln.models.card import model_card

    _, out, _ = sweep
    card = model_card(out["tracking_uri"], out["model_uri"])
    assert f"- Tuned: sweep run `{out['sweep_run_id']}`, trial {out['best_trial']};" in card
    assert "best true" in card
    assert "- Rows per split: train " in card and "| class | train | val | test |" in card
