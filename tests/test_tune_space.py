"""The tune: section and its search space: forms, keys, values; Pareto front and best-trial rules.

No Ray here: these check what fails before a sweep starts, and the pure result rules.
"""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import REPO, run_kiln
from kiln.errors import ConfigError
from kiln.schema import load_config, validate_config
from kiln.tune.config import Objective
from kiln.tune.results import (
    COMPLETED,
    STOPPED_EARLY,
    TrialSummary,
    dominates,
    pareto_front,
    pick_best,
)
from kiln.tune.space import apply_params, decode_params, parse_space
from kiln.tune.sweep import check_sweep
from kiln.tune.trial_config import trial_train_config

BASE = {
    "experiment": {"name": "t"},
    "data": {"source": "digits", "image": "image"},
    "model": {"name": "cnn", "width": 8},
    "train": {"epochs": 3},
    "tune": {"space": {"train.lr": {"loguniform": [1.0e-4, 1.0e-1]}}},
}


def config_with_space(space, **tune):
    data = copy.deepcopy(BASE)
    data["tune"] = {"space": space, **tune}
    return data


def sweep_error(space, **tune) -> str:
    with pytest.raises(ConfigError) as info:
        check_sweep(validate_config(config_with_space(space, **tune)))
    return str(info.value)


def test_default_sweep_config_is_valid():
    cfg = load_config(REPO / "configs/tune/digits_cnn.yaml")
    dims = check_sweep(cfg)
    assert [d.key for d in dims] == [
        "train.lr",
        "model.width",
        "train.weight_decay",
        "train.batch_size",
    ]
    assert cfg.tune.asha is not None and cfg.tune.primary.metric == "val_accuracy"


@pytest.mark.parametrize(
    "space, expected",
    [
        (
            {"train.lrr": {"loguniform": [1e-4, 1e-1]}},
            "'train.lrr' is not a train-config key (did you mean 'train.lr'?)",
        ),
        (
            {"trian.lr": {"loguniform": [1e-4, 1e-1]}},
            "'trian.lr' is not a train-config key (did you mean 'train'?)",
        ),
        ({"experiment.name": {"choice": ["a", "b"]}}, "not a train-config key"),
        ({"train.checkpoint": {"choice": [1, 2]}}, "'train.checkpoint' is a section"),
        ({"train.lr.x": {"uniform": [0.1, 0.2]}}, "'train.lr' is a value, not a section"),
        (
            {"model.hidden": {"choice": [[64], [128]]}},
            "unknown config key 'model.hidden' for model 'cnn'",
        ),
        ({"train.epochs": {"int": [1, 5]}}, "tune.max_epochs"),
        (
            {"train.batch_size": {"uniform": [16, 64]}},
            "use {int: [low, high]} for a whole-number key",
        ),
        ({"train.optimizer": {"choice": ["adamw", "lamb"]}}, "value 'lamb' is not accepted"),
    ],
)
def test_space_key_or_value_not_in_train_config_is_a_config_error(space, expected):
    message = sweep_error(space)
    assert expected in message
    assert message.startswith("config key 'tune.space.")


@pytest.mark.parametrize(
    "spec, expected",
    [
        ({"loguniform": [0.0, 1.0]}, "loguniform needs 0 < low"),
        ({"uniform": [0.5, 0.1]}, "needs low < high"),
        ({"uniform": [0.1]}, "needs [low, high] (two numbers)"),
        ({"uniform": ["a", "b"]}, "needs [low, high] (two numbers)"),
        ({"int": [1.5, 4]}, "int needs whole-number bounds"),
        ({"choice": []}, "non-empty list"),
        ({"choice": [1, 1]}, "lists a value twice"),
        (
            {"logunifrom": [1e-4, 1e-1]},
            "unknown distribution 'logunifrom' (did you mean 'loguniform'?)",
        ),
        ([1e-4, 1e-1], "expected one of"),
        ({"uniform": [0, 1], "int": [0, 1]}, "expected one of"),
    ],
)
def test_malformed_range_is_a_config_error_naming_the_key(spec, expected):
    with pytest.raises(ConfigError) as info:
        validate_config(config_with_space({"train.weight_decay": spec}))
    assert str(info.value).startswith("config key 'tune.space.train.weight_decay'")
    assert expected in str(info.value)


def test_section_level_errors():
    with pytest.raises(ConfigError, match="search space is empty"):
        validate_config(config_with_space({}))
    with pytest.raises(ConfigError, match="each metric at most once"):
        validate_config(
            config_with_space(BASE["tune"]["space"], objectives=[{"metric": "params"}] * 2)
        )
    with pytest.raises(ConfigError, match="no objective is a per-epoch metric"):
        validate_config(
            config_with_space(
                BASE["tune"]["space"], objectives=[{"metric": "params", "mode": "min"}]
            )
        )
    with pytest.raises(ConfigError, match="tune.objectives.0.metric"):
        validate_config(
            config_with_space(BASE["tune"]["space"], objectives=[{"metric": "accuracy"}])
        )
    assert "grace_period" in sweep_error(BASE["tune"]["space"], asha={"grace_period": 5})
    with pytest.raises(ConfigError, match="no 'tune:' section"):
        check_sweep(validate_config({k: v for k, v in BASE.items() if k != "tune"}))


def test_choice_of_lists_round_trips_through_optuna_values():
    data = copy.deepcopy(BASE)
    data["model"] = {"name": "mlp"}
    data["tune"] = {
        "space": {
            "model.hidden": {"choice": [[64], [128, 64]]},
            "model.dropout": {"uniform": [0, 0.5]},
            "train.batch_size": {"int": [16, 64]},
        }
    }
    cfg = validate_config(data)
    dims = check_sweep(cfg)
    hidden = dims[0]
    assert hidden.encoded_choices == ("[64]", "[128, 64]")  # Optuna stores scalars only
    values = decode_params(
        dims, {"model.hidden": "[128, 64]", "model.dropout": 0.25, "train.batch_size": 32}
    )
    assert values == {"model.hidden": [128, 64], "model.dropout": 0.25, "train.batch_size": 32}
    trial_cfg = validate_config(apply_params(trial_train_config(cfg, absolute_paths=False), values))
    assert trial_cfg.model.kwargs == {"hidden": [128, 64], "dropout": 0.25}
    assert trial_cfg.train.batch_size == 32 and trial_cfg.tune is None


def test_trial_config_takes_epochs_workers_and_cpus_from_the_sweep():
    cfg = validate_config(
        config_with_space(
            BASE["tune"]["space"], max_epochs=7, trial_workers=2, cpus_per_worker=0.25
        )
    )
    train = trial_train_config(cfg, absolute_paths=True)["train"]
    assert (train["epochs"], train["workers"], train["cpus_per_worker"]) == (7, 2, 0.25)


def trial(number, acc, params, status=COMPLETED):
    return TrialSummary(
        number=number,
        trial_id=f"t{number}",
        status=status,
        epochs=3 if status == COMPLETED else 1,
        metrics={"val_accuracy": acc, "params": params},
    )


TWO = [Objective(metric="val_accuracy", mode="max"), Objective(metric="params", mode="min")]


def test_dominance_respects_each_objectives_direction():
    modes = ["max", "min"]
    assert dominates([0.9, 100], [0.8, 200], modes)
    assert dominates([0.9, 100], [0.9, 200], modes)
    assert not dominates([0.9, 100], [0.9, 100], modes)  # equal: neither dominates
    assert not dominates([0.9, 300], [0.8, 200], modes)


def test_pareto_front_keeps_exactly_the_non_dominated_trials():
    trials = [
        trial(1, 0.95, 5000),
        trial(2, 0.90, 1000),
        trial(3, 0.85, 3000),
        trial(4, 0.97, 9000),
        trial(5, 0.90, 1000),
        trial(6, 0.99, 800, status=STOPPED_EARLY),
    ]
    front = pareto_front(trials, TWO)
    # 3 is dominated by 2; 5 ties 2 (kept once); 6 was stopped early (not comparable with full
    # trials)
    assert [t.number for t in front] == [4, 1, 2]
    assert pick_best(trials, TWO).number == 4


def test_best_is_chosen_among_trials_that_trained_every_epoch():
    trials = [trial(1, 0.90, 1), trial(2, 0.95, 1, status=STOPPED_EARLY), trial(3, 0.93, 1)]
    assert pick_best(trials, TWO[:1]).number == 3
    assert (
        pick_best([trial(2, 0.95, 1, status=STOPPED_EARLY)], TWO[:1]).number == 2
    )  # nothing else to pick


def test_cli_bad_space_is_one_error_line_exit_2(tmp_path):
    data = config_with_space({"train.lr": {"loguniform": [0, 0.1]}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = run_kiln("tune", str(path), timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "error: config key 'tune.space.train.lr': loguniform needs 0 < low, got [0, 0.1]"
    ]
    assert "Traceback" not in proc.stdout + proc.stderr

    proc = run_kiln("tune", str(path), "tune.space={train.lrr: {uniform: [0.1, 0.2]}}", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: config key 'tune.space.train.lrr': 'train.lrr' is not a train-config key "
        "(did you mean 'train.lr'?)"
    )


def test_resume_finds_the_latest_unfinished_sweep_of_the_config(tmp_path):
    from kiln.errors import KilnError
    from kiln.tune.folder import FINISHED, create_sweep_folder, latest_sweep_folder

    data = config_with_space(BASE["tune"]["space"])
    data["experiment"]["run_dir"] = str(tmp_path / "runs")
    cfg = validate_config(data)
    with pytest.raises(KilnError, match="no sweep named 't' under .* to resume"):
        latest_sweep_folder(cfg)
    first = create_sweep_folder(cfg)
    first.save(status="interrupted", config=cfg.to_dict())
    other = validate_config({**data, "tune": {**data["tune"], "name": "t-other"}})
    create_sweep_folder(other).save(
        status="interrupted"
    )  # another sweep whose name starts the same
    assert latest_sweep_folder(cfg).path == first.path
    second = create_sweep_folder(cfg)  # same second: gets a suffix, and is the latest
    second.save(status=FINISHED)
    with pytest.raises(KilnError, match="already finished; run without --resume"):
        latest_sweep_folder(cfg)


def test_resume_refuses_a_changed_config(tmp_path):
    from kiln.tune.folder import SweepFolder, check_same_config

    cfg = validate_config(config_with_space(BASE["tune"]["space"]))
    folder = SweepFolder(tmp_path, {"config": cfg.to_dict()})
    check_same_config(folder, cfg.to_dict())
    changed = copy.deepcopy(cfg.to_dict())
    changed["tune"]["num_samples"] = 99
    changed["train"]["lr"] = 0.5
    with pytest.raises(ConfigError, match="differs from sweep .* at train.lr, tune.num_samples"):
        check_same_config(folder, changed)


def test_each_trial_gets_a_status_from_how_it_ended():
    from types import SimpleNamespace

    from kiln.tune.results import (
        FAILED,
        INTERRUPTED,
        NOT_STARTED,
        STOPPED,
        STOPPED_BY_BUDGET,
        summarize,
    )

    dims = parse_space({"train.lr": {"loguniform": [1e-4, 1e-1]}})

    def result(number, epochs, error=None):
        metrics = (
            {"epochs_done": epochs, "val_accuracy": 0.5, "config": {"train.lr": 0.01}}
            if epochs
            else {}
        )
        return SimpleNamespace(
            path=f"/x/tune/trial_{number:04d}_id{number}",
            metrics=metrics,
            error=error,
            checkpoint=None,
            metrics_dataframe=None,
        )

    grid = [
        result(3, 1),
        result(1, 3),
        result(2, 1),
        result(4, 2),
        result(5, 0),
        result(6, 1, RuntimeError("x\nValueError: bad")),
    ]
    trials = summarize(
        grid,
        dims,
        3,
        early_stops={"id2": 1},
        budget_hit=False,
        child_runs={"id1": "run1"},
        unfinished={"id4", "id5"},
    )
    assert [(t.number, t.status) for t in trials] == [
        (1, COMPLETED),
        (2, STOPPED_EARLY),
        (3, STOPPED),
        (4, INTERRUPTED),
        (5, INTERRUPTED),
        (6, FAILED),
    ]
    assert trials[0].run_id == "run1" and trials[0].params == {"train.lr": 0.01}
    assert trials[5].error == "ValueError: bad"
    budget = summarize(
        grid[:5], dims, 3, early_stops={}, budget_hit=True, child_runs={}, unfinished=set()
    )
    assert [t.status for t in budget] == [
        COMPLETED,
        STOPPED_BY_BUDGET,
        STOPPED_BY_BUDGET,
        STOPPED_BY_BUDGET,
        NOT_STARTED,
    ]


def test_model_measures_count_parameters_and_time_batch_one(ray_cluster):
    from kiln.data.dataset import prepare_data
    from kiln.models.artifact import build_model
    from kiln.models.builders import count_parameters
    from kiln.train.loop import model_spec
    from kiln.tune.trial import model_measures

    cfg = validate_config(trial_train_config(validate_config(BASE), absolute_paths=False))
    data = prepare_data(cfg.data)
    measures = model_measures(cfg, data, ("latency_ms",))
    assert measures["params"] == count_parameters(build_model(model_spec(cfg, data)))
    assert measures["latency_ms"] > 0
    assert set(model_measures(cfg, data, ())) == {
        "params"
    }  # latency only when an objective needs it


def test_recording_asha_writes_each_early_stop_with_its_epoch(tmp_path):
    """RecordingASHA records what ASHA stopped (and at which epoch) without ASHA's private state;
    a trial that reaches max_t is not an early stop."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from kiln.tune.scheduler import EARLY_STOPS_FILE, RecordingASHA, read_early_stops
    from kiln.tune.trial import TIME_ATTR

    path = tmp_path / EARLY_STOPS_FILE
    asha = RecordingASHA(
        record_path=str(path),
        time_attr=TIME_ATTR,
        max_t=3,
        metric="val_accuracy",
        mode="max",
        grace_period=1,
        reduction_factor=2,
    )
    good, bad = SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="bad")
    for trial in (good, bad):
        asha.on_trial_add(None, trial)
    assert asha.on_trial_result(None, good, {TIME_ATTR: 1, "val_accuracy": 0.9}) == (
        TrialScheduler.CONTINUE
    )
    assert asha.on_trial_result(None, bad, {TIME_ATTR: 1, "val_accuracy": 0.1}) == (
        TrialScheduler.STOP
    )
    assert read_early_stops(path) == {"bad": 1}
    asha.on_trial_result(None, good, {TIME_ATTR: 3, "val_accuracy": 0.95})  # its last epoch
    assert read_early_stops(path) == {"bad": 1}
