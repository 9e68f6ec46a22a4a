"""Warm starts and growing sweeps, the parts that need no Ray: reading a previous sweep's trials,
which of them fit a new space, the seeded Optuna study, and which finished sweeps --resume grows.

The sweeps themselves (a warm-started sweep proposing near the first's best, a grown sweep running
only its new trials) are in tests/test_tune_grow.py.
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from conftest import run_kiln
from kiln.errors import ConfigError, KilnError
from kiln.schema import validate_config
from kiln.tune.config import Objective
from kiln.tune.space import parse_space
from kiln.tune.trial_config import trial_train_config
from kiln.tune.warm_start import STUDY_NAME, load_warm_start, seeded_storage

BASE = {
    "experiment": {"name": "t"},
    "data": {"source": "digits", "image": "image"},
    "model": {"name": "cnn", "width": 8},
    "train": {"epochs": 3, "batch_size": 64},
    "tune": {
        "space": {
            "train.lr": {"loguniform": [1.0e-4, 1.0e-1]},
            "model.width": {"int": [4, 16]},
            "model.hidden": {"choice": [[32], [64, 32]]},
        }
    },
}
OBJECTIVES = [Objective(metric="val_accuracy", mode="max")]


def trial(number, status="completed", acc=0.9, **params):
    values = {"train.lr": 0.01, "model.width": 8, "model.hidden": [32], **params}
    return {
        "number": number,
        "status": status,
        "params": values,
        "metrics": {"val_accuracy": acc, "val_loss": 0.3} if acc is not None else {},
    }


def source_sweep(tmp_path, trials):
    folder = tmp_path / "sweeps" / "t-20261127-000000"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"trials": trials}))
    (folder / "sweep.json").write_text(json.dumps({"parent_run_id": "abc123", "config": {}}))
    return folder


def warm_for(folder, data=BASE, store=None):
    cfg = validate_config(copy.deepcopy(data))
    dims = parse_space(cfg.tune.space)
    base = trial_train_config(cfg, absolute_paths=False)
    uri = f"sqlite:///{store or folder}/mlflow.db"
    return load_warm_start(str(folder), dims, OBJECTIVES, base, uri), dims


def test_trials_outside_the_new_space_are_skipped_with_the_reason(tmp_path):
    folder = source_sweep(
        tmp_path,
        [
            trial(1, acc=0.95),
            trial(2, acc=0.5, **{"train.lr": 0.5}),  # above the new range
            trial(3, acc=0.8, **{"model.width": 32}),
            trial(4, acc=0.7, **{"model.hidden": [128]}),  # not a choice here
            trial(5, status="failed", acc=None),
            trial(6, status="stopped_early", acc=0.6, **{"model.hidden": [64, 32]}),
            trial(7, acc=0.9, **{"train.batch_size": 16}),  # not searched here, and differs
            trial(8, acc=0.9, **{"train.batch_size": 64}),  # not searched here, and the same
        ],
    )
    warm, dims = warm_for(folder)
    assert [t.number for t in warm.trials] == [1, 6, 8]
    assert warm.trials[0].values == [0.95]
    # choices as Optuna stores them: lists as their JSON text
    assert warm.trials[1].encoded["model.hidden"] == json.dumps([64, 32])
    reasons = dict(warm.skipped)
    assert reasons[2] == "train.lr=0.5 is outside [0.0001, 0.1]"
    assert reasons[3] == "model.width=32 is outside [4, 16]"
    assert reasons[4] == "model.hidden=[128] is not one of [[32], [64, 32]]"
    assert reasons[5] == "status failed"
    assert reasons[7].startswith("train.batch_size=16 is not searched here")
    assert warm.sweep_dir == str(folder.resolve()) and warm.run_id == "abc123"
    assert warm.lineage()["trials_used"] == [1, 6, 8]
    assert "3 trial(s) used, 5 skipped (trial 2: train.lr=0.5 is outside" in warm.summary()


def test_a_key_the_source_did_not_search_cannot_be_warm_started(tmp_path):
    folder = source_sweep(tmp_path, [trial(1)])
    data = copy.deepcopy(BASE)
    data["tune"]["space"]["train.weight_decay"] = {"uniform": [0.0, 0.01]}
    with pytest.raises(KilnError, match="none of the 1 trial.*train.weight_decay was not searched"):
        warm_for(folder, data)


def test_a_bad_source_is_one_clear_error(tmp_path):
    with pytest.raises(KilnError, match="is neither a sweep folder nor a sweep's MLflow run id"):
        warm_for(tmp_path / "nope" / "sweep")
    with pytest.raises(KilnError, match="holds no results.json"):
        warm_for(tmp_path)
    with pytest.raises(KilnError, match=r"no such run in sqlite:///"):
        warm_for("0123abcd", store=tmp_path)


def test_the_seeded_study_holds_the_warm_trials_and_tpe_models_them(tmp_path):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from kiln.tune.space import optuna_space

    folder = source_sweep(
        tmp_path,
        [trial(n, acc=0.5 + 0.05 * n, **{"train.lr": 1e-4 * 2**n}) for n in range(1, 8)],
    )
    warm, dims = warm_for(folder)
    storage = seeded_storage(warm, dims, OBJECTIVES)
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    assert len(study.trials) == 7 and study.best_value == pytest.approx(0.85)
    searcher = OptunaSearch(
        space=optuna_space(dims),
        metric="val_accuracy",
        mode="max",
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=4),
        storage=storage,
        study_name=STUDY_NAME,
    )
    suggested = searcher.suggest("new-trial")
    assert set(suggested) == {"train.lr", "model.width", "model.hidden"}
    assert len(optuna.load_study(study_name=STUDY_NAME, storage=storage).trials) == 8


def test_cli_bad_warm_start_is_one_error_line_exit_2(tmp_path):
    path = tmp_path / "sweep.yaml"
    data = copy.deepcopy(BASE)
    data["experiment"]["run_dir"] = str(tmp_path / "runs")
    del data["tune"]["space"]["model.hidden"]  # a key of MLP models: the CNN would refuse it
    path.write_text(yaml.safe_dump(data))
    proc = run_kiln("tune", str(path), "--warm-start", str(tmp_path / "missing"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --warm-start: {tmp_path / 'missing'} is neither a sweep folder nor a sweep's "
        "MLflow run id"
    )
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs" / "sweeps").exists()  # nothing started


def test_resume_grows_a_finished_sweep_only_with_a_larger_num_samples(tmp_path):
    from kiln.tune.folder import (
        FINISHED,
        check_same_config,
        create_sweep_folder,
        latest_sweep_folder,
    )
    from kiln.tune.sweep import run_sweep

    data = copy.deepcopy(BASE)
    data["experiment"]["run_dir"] = str(tmp_path / "runs")
    data["tune"]["num_samples"] = 4
    del data["tune"]["space"]["model.hidden"]
    cfg = validate_config(data)
    folder = create_sweep_folder(cfg)
    folder.save(status=FINISHED, config=cfg.to_dict())
    with pytest.raises(KilnError, match="raise tune.num_samples above 4 to add trials"):
        latest_sweep_folder(cfg)
    bigger = validate_config({**data, "tune": {**data["tune"], "num_samples": 6}})
    assert latest_sweep_folder(bigger).path == folder.path
    check_same_config(folder, bigger.to_dict())  # growing is not a changed config
    smaller = validate_config({**data, "tune": {**data["tune"], "num_samples": 3}})
    with pytest.raises(ConfigError, match="differs from sweep .* at tune.num_samples"):
        check_same_config(folder, smaller.to_dict())
    with pytest.raises(ConfigError, match="--warm-start seeds a new sweep"):
        run_sweep(bigger, resume=True, warm_start=str(folder.path))
