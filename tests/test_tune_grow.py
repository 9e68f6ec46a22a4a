"""Growing a finished sweep with --resume and a larger tune.num_samples, and warm-starting a new
sweep from it, against the session's real Ray instance and a real MLflow sqlite store.

One chain of module fixtures (so the tests hold in any order): a first sweep of 4 random trials,
grown to 6, then a second sweep warm-started from the grown one. Tiny: digits, a small CNN, 2
epochs per trial, no ASHA.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from kiln import tracking as trk
from kiln.schema import load_config, validate_config
from kiln.tune.results import COMPLETED

pytestmark = [pytest.mark.slow, pytest.mark.module_seconds(100)]

SPACE = {"train.lr": {"loguniform": [1.0e-4, 5.0e-2]}, "model.width": {"int": [4, 16]}}


def sweep_config(run_dir: Path, name: str, **tune):
    return validate_config(
        {
            "experiment": {"name": name, "run_dir": str(run_dir)},
            "data": {"source": "digits", "image": "image"},
            "model": {"name": "cnn", "width": 8, "dropout": 0.0},
            "train": {"epochs": 2, "batch_size": 64, "lr": 0.003, "seed": 0},
            "tune": {
                "space": SPACE,
                "searcher": "random",
                "seed": 3,
                "num_samples": 4,
                "cpus_per_worker": 0.5,
                "asha": None,
                **tune,
            },
        }
    )


def attempts(uri: str, run_id: str) -> list[float]:
    return [m.value for m in trk.metric_history(uri, run_id, "trial_attempt")]


@pytest.fixture(scope="module")
def first(ray_cluster, tmp_path_factory):
    """A finished sweep of 4 trials: (SweepResult, run_dir)."""
    from kiln.tune.sweep import run_sweep

    run_dir = tmp_path_factory.mktemp("grow") / "runs"
    result = run_sweep(sweep_config(run_dir, "tune-grow"), address=ray_cluster)
    return result, run_dir


@pytest.fixture(scope="module")
def grown(first, ray_cluster):
    """The first sweep resumed with tune.num_samples=6: (SweepResult, the first's trial ids)."""
    from kiln.tune.sweep import run_sweep

    result, run_dir = first
    before = {t.number: t.trial_id for t in result.trials}
    lines: list[str] = []
    again = run_sweep(
        sweep_config(run_dir, "tune-grow", num_samples=6),
        address=ray_cluster,
        resume=True,
        progress=lines.append,
    )
    assert any("growing sweep" in line and "from 4 to 6 trials" in line for line in lines), lines
    return again, before


@pytest.fixture(scope="module")
def warm(grown, ray_cluster):
    """A new sweep (TPE, one trial at a time) warm-started from the grown sweep's folder."""
    from kiln.tune.sweep import run_sweep

    source, _ = grown
    run_dir = Path(source.sweep_dir).parents[1]
    cfg = sweep_config(
        run_dir, "tune-warm", searcher="tpe", seed=0, num_samples=2, max_concurrent_trials=1
    )
    lines: list[str] = []
    result = run_sweep(cfg, address=ray_cluster, warm_start=source.sweep_dir, progress=lines.append)
    return result, source, lines


def test_resume_with_a_larger_num_samples_runs_only_the_new_trials(grown):
    result, before = grown
    assert result.resumed and result.kept_from_before == 4
    assert [t.number for t in result.trials] == [1, 2, 3, 4, 5, 6]
    assert {t.number: t.trial_id for t in result.trials if t.number <= 4} == before
    assert {t.status for t in result.trials} == {COMPLETED}
    uri = result.tracking_uri
    for t in result.trials:  # the first four did not train again
        assert attempts(uri, t.run_id) == [1.0], t.number
    state = json.loads((Path(result.sweep_dir) / "sweep.json").read_text())
    assert state["status"] == "finished" and state["config"]["tune"]["num_samples"] == 6
    assert [(g["from"], g["to"]) for g in state["grown"]] == [(4, 6)]
    parent = trk.get_run(uri, result.run_id)
    assert parent.data.tags["kiln.tune.grown"] == "4->6"
    assert parent.data.metrics["trials"] == 6


def test_the_grown_sweeps_best_and_outputs_cover_every_trial(grown, tmp_path):
    from kiln.data.dataset import prepare_data
    from kiln.train.loop import train_epochs
    from kiln.train.session import LocalSession

    result, _ = grown
    best = max(result.trials, key=lambda t: (t.metrics["val_accuracy"], -t.number))
    assert result.best is not None and result.best.number == best.number
    saved = json.loads((Path(result.sweep_dir) / "results.json").read_text())
    assert [t["number"] for t in saved["trials"]] == [1, 2, 3, 4, 5, 6]
    assert saved["best_trial"] == best.number
    assert saved["lineage"]["grown"][0]["to"] == 6
    # best.yaml is the best of all six, and reproduces its metric (one worker, same seed): its
    # config trained by the loop the trial ran, in this process (a trial's metrics are its last
    # epoch's). `kiln train`'s Ray Train path reproducing a trial is test_tune_sweep.py's
    # test_best_yaml_trains_to_the_best_trials_metric: here one Ray Train job less.
    cfg = load_config(result.best_config_path)
    reports = train_epochs(cfg, prepare_data(cfg.data), LocalSession(tmp_path))
    assert len(reports) == cfg.train.epochs == 2
    assert reports[-1]["val_accuracy"] == pytest.approx(best.metrics["val_accuracy"], abs=1e-9)
    assert trk.model_version_for(result.tracking_uri, result.model_uri).run_id == best.run_id


def test_a_warm_started_sweep_begins_near_the_previous_best(warm):
    result, source, lines = warm
    previous = [t.metrics["val_accuracy"] for t in source.trials]
    first_new = min(result.trials, key=lambda t: t.number)
    assert first_new.status == COMPLETED
    # TPE sees the 6 warm trials (more than its 4 start-up trials): it models the space at once.
    assert first_new.metrics["val_accuracy"] >= statistics.median(previous), (
        first_new.params,
        sorted(previous),
    )
    assert any("warm start from" in line and "6 trial(s) used" in line for line in lines), lines


def test_the_warm_start_is_in_the_sweeps_lineage(warm):
    result, source, _ = warm
    assert result.lineage["warm_start"]["sweep_dir"] == source.sweep_dir
    assert result.lineage["warm_start"]["run_id"] == source.run_id
    assert result.lineage["warm_start"]["trials_used"] == [1, 2, 3, 4, 5, 6]
    saved = json.loads((Path(result.sweep_dir) / "results.json").read_text())
    assert saved["lineage"] == result.lineage
    tags = trk.get_run(result.tracking_uri, result.run_id).data.tags
    assert tags["kiln.tune.warm_start"] == source.run_id
    assert (
        tags["kiln.tune.warm_start_trials"] == "6" and tags["kiln.tune.warm_start_skipped"] == "0"
    )
    # a run id works as the source too (read through MLflow)
    from kiln.tune.config import Objective
    from kiln.tune.space import parse_space
    from kiln.tune.warm_start import load_warm_start

    dims = parse_space(SPACE)
    cfg = yaml.safe_load(Path(result.best_config_path).read_text())
    by_run = load_warm_start(source.run_id, dims, [Objective()], cfg, result.tracking_uri)
    assert [t.number for t in by_run.trials] == [1, 2, 3, 4, 5, 6]
