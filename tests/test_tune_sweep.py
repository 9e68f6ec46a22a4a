"""kiln tune end to end, against the session's real Ray instance (2 CPUs) and a real MLflow sqlite
store: one single-objective sweep through the CLI (the resumed and multi-worker sweeps are in
test_tune_resume.py, so that the two xdist workers can run them at the same time).

Sweeps are tiny (digits, a small CNN, 2-3 epochs, trials at 0.5 CPU), but real: Optuna's TPE
through Ray Tune's OptunaSearch, ASHA, per-trial MLflow child runs, the registry.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import last_json, run_kiln
from kiln import tracking as trk
from kiln.schema import load_config
from kiln.train.run import run_training
from kiln.tune.results import COMPLETED, STOPPED_EARLY
from kiln.waiting import wait_until
from ray_actors import alive_actors, all_actors
from sweeps import child_runs, epochs_logged, write_config

pytestmark = pytest.mark.module_seconds(80)


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
def test_the_sweep_runs_its_trials_on_the_address_it_was_given(sweep, ray_cluster):
    """``kiln tune --address`` runs its trials on that instance: before the fix, reading the data
    started a local Ray instance first and the whole sweep ran there."""
    import ray

    own_job = ray.get_runtime_context().get_job_id()
    # finished trials' actors are listed as DEAD; Tune reuses one actor for several trials
    trial_jobs = {
        a.job_id
        for a in all_actors(ray_cluster)
        if a.class_name == "ImplicitFunc" and a.job_id != own_job
    }
    assert trial_jobs, "no trial of the sweep ran on the instance at --address"


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
    # A run in a long-lived driver's main thread leaves none of its Ray Train actors behind.
    wait_until(
        lambda: not _alive_train_actors(ray_cluster),
        timeout=30,
        what="the training run's Ray Train actors to end",
    )


def _alive_train_actors(address: str) -> list[str]:
    train_actors = {"TrainController", "DatasetManager", "RayTrainWorker"}
    return [a.class_name for a in alive_actors(address) if a.class_name in train_actors]


@pytest.mark.slow
def test_the_tuned_versions_model_card_names_its_sweep_and_trial(sweep):
    from kiln.models.card import model_card

    _, out, _ = sweep
    card = model_card(out["tracking_uri"], out["model_uri"])
    assert f"- Tuned: sweep run `{out['sweep_run_id']}`, trial {out['best_trial']};" in card
    assert "best true" in card
    assert "- Rows per split: train " in card and "| class | train | val | test |" in card
