"""The train config every trial of a sweep starts from (before its sampled values are applied)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln import tracking as trk
from kiln.tune.config import TuneJobConfig
from kiln.tune.space import train_config_dict


def trial_epochs(cfg: TuneJobConfig) -> int:
    """Epochs of a trial that is not stopped: ``tune.max_epochs``, else ``train.epochs``."""
    return cfg.require_tune().max_epochs or cfg.train.epochs


def trial_train_config(cfg: TuneJobConfig, absolute_paths: bool) -> dict[str, Any]:
    """The train config every trial starts from: the sweep sets epochs, workers and resources.

    With ``absolute_paths`` the run folder, tracking store and a local data source are made
    absolute, because Ray Tune runs trials in their own working directories.
    """
    t = cfg.require_tune()
    data = train_config_dict(cfg)
    data["train"].update(
        epochs=trial_epochs(cfg),
        workers=t.trial_workers,
        cpus_per_worker=t.cpus_per_worker,
        use_gpu=t.gpus_per_worker > 0,
    )
    if absolute_paths:
        exp = data["experiment"]
        exp["run_dir"] = str(Path(exp["run_dir"]).expanduser().resolve())
        exp["tracking_uri"] = trk.resolve_tracking_uri(
            cfg.experiment.tracking_uri, cfg.experiment.run_dir
        )
        if exp.get("storage_path") and "://" not in exp["storage_path"]:
            exp["storage_path"] = str(Path(exp["storage_path"]).expanduser().resolve())
        source = Path(data["data"]["source"]).expanduser()
        if source.exists():
            data["data"]["source"] = str(source.resolve())
    return data
