"""Tune test helpers: the tiny sweep config the end-to-end tune modules run (digits, a small CNN,
3 epochs, trials at 0.5 CPU) and readers of a sweep's MLflow runs."""

from __future__ import annotations

from pathlib import Path

import yaml

from kiln import tracking as trk

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
