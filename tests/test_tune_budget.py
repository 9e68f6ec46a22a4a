"""A sweep sized by a budget in trial epochs (``tune.budget_epochs``): the stopper's counting, and
one real sweep (the session's Ray instance, a real MLflow sqlite store) in which the epochs ASHA
saves go to more trials."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from kiln.schema import validate_config
from kiln.tune.budget import EpochBudget, budget_spent
from kiln.tune.results import COMPLETED, NOT_STARTED, STOPPED_BY_BUDGET, STOPPED_EARLY
from kiln.tune.trial import TIME_ATTR

pytestmark = pytest.mark.module_seconds(60)

SPACE = {"train.lr": {"loguniform": [1.0e-4, 5.0e-2]}, "model.width": {"int": [4, 16]}}


def test_the_budget_counts_each_trials_latest_epoch_once():
    stopper = EpochBudget(5, "/nonexistent")
    assert stopper("a", {TIME_ATTR: 1}) is False
    stopper("a", {TIME_ATTR: 2})
    stopper("a", {TIME_ATTR: 1})  # the trial restarted from its epoch-1 checkpoint
    stopper("b", {TIME_ATTR: 2})
    assert stopper.spent == 4 and not stopper.stop_all()
    stopper("b", {"no epoch": 1})
    assert not stopper.stop_all()
    stopper("c", {TIME_ATTR: 1})
    assert stopper.spent == 5 and stopper.stop_all()
    assert budget_spent([2, 2, 1], 5) and not budget_spent([2, 2], 5)
    assert not budget_spent([100], None)


def test_a_resumed_sweeps_stopper_counts_the_epochs_already_spent(tmp_path):
    # Ray Tune restores the stopper it saved when the sweep started (no results yet): the copy
    # reads what the trials had reported from their result.json files.
    stopper = EpochBudget(6, str(tmp_path))
    saved = pickle.dumps(stopper)
    for trial, epochs in (("t1", 3), ("t2", 2)):
        folder = tmp_path / f"trial_{trial}"
        folder.mkdir()
        lines = [json.dumps({"trial_id": trial, TIME_ATTR: e}) for e in range(1, epochs + 1)]
        (folder / "result.json").write_text("\n".join(lines) + '\n{"trial_id": "t2", "epo')
    restored = pickle.loads(saved)
    assert not restored.stop_all() and restored.spent == 5
    restored("t2", {TIME_ATTR: 2})  # replayed: not counted again
    assert restored.spent == 5
    restored("t3", {TIME_ATTR: 1})
    assert restored.stop_all()


def test_a_sweep_with_an_epoch_budget_spends_it_on_more_trials(ray_cluster, tmp_path):
    from kiln.tune.sweep import run_sweep

    budget, epochs = 8, 2
    cfg = validate_config(
        {
            "experiment": {"name": "tune-budget", "run_dir": str(tmp_path / "runs")},
            "data": {"source": "digits", "image": "image"},
            "model": {"name": "cnn", "width": 8, "dropout": 0.0},
            "train": {"epochs": epochs, "batch_size": 64, "lr": 0.003, "seed": 0},
            "tune": {
                "space": SPACE,
                "searcher": "random",
                "seed": 1,
                "num_samples": 40,
                "budget_epochs": budget,
                "max_concurrent_trials": 2,
                "cpus_per_worker": 0.5,
                "asha": {"grace_period": 1, "reduction_factor": 2},
            },
        }
    )
    lines: list[str] = []
    result = run_sweep(cfg, address=ray_cluster, progress=lines.append)
    trials = result.trials
    spent = sum(t.epochs for t in trials)
    # The sweep ends on the report that spends the budget; the other running trial may have
    # reported once more in the same step.
    assert budget <= spent <= budget + 1, [(t.number, t.status, t.epochs) for t in trials]
    assert {t.status for t in trials} <= {COMPLETED, STOPPED_EARLY, STOPPED_BY_BUDGET, NOT_STARTED}
    stopped = [t for t in trials if t.status == STOPPED_EARLY]
    assert stopped, [(t.number, t.status, t.epochs) for t in trials]
    trained = [t for t in trials if t.epochs > 0]
    # without the budget, 8 epochs would be 4 trials of 2; ASHA's early stops paid for more
    assert len(trained) > budget // epochs
    assert len(trials) < 40  # the budget ended the sweep, not num_samples
    assert result.best is not None and result.best.status == COMPLETED
    assert any(f"/{budget} epochs of the budget" in line for line in lines), lines
    saved = json.loads((Path(result.sweep_dir) / "results.json").read_text())
    assert len(saved["trials"]) == len(trials)
