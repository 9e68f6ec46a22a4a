"""ASHA early stopping that records which trials it stopped, and at which epoch.

Ray Tune does not say why a trial ended, and a resumed sweep starts from a fresh copy of the
scheduler, so every stop decision is appended to a JSON file in the sweep's folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from kiln.tune.trial import TIME_ATTR

EARLY_STOPS_FILE = "early_stops.json"


def read_early_stops(path: str | Path) -> dict[str, int]:
    """``{trial_id: epochs it had trained}`` for every trial ASHA stopped (empty when none)."""
    try:
        return {k: int(v) for k, v in json.loads(Path(path).read_text()).items()}
    except (OSError, ValueError):
        return {}


def record_early_stop(path: str | Path, trial_id: str, epochs_done: int) -> None:
    stops = read_early_stops(path)
    stops[trial_id] = epochs_done
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(stops, indent=1, sort_keys=True))
    os.replace(
        tmp, path
    )  # atomic: a killed driver leaves the old or the new file, never half of one


class RecordingASHA(AsyncHyperBandScheduler):
    """AsyncHyperBandScheduler (ASHA) that writes each early stop to ``record_path``."""

    def __init__(self, record_path: str, **kwargs):
        super().__init__(**kwargs)
        self.record_path = record_path

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        done = result.get(self._time_attr)
        if decision == TrialScheduler.STOP and done is not None and done < self._max_t:
            record_early_stop(self.record_path, trial.trial_id, int(done))
        return decision


def make_scheduler(tune_cfg, max_epochs: int, sweep_dir: Path):
    """RecordingASHA for ``tune.asha``, or None (run every trial to the end) when it is null."""
    if tune_cfg.asha is None:
        return None
    metric, mode = tune_cfg.asha_metric()
    a = tune_cfg.asha
    return RecordingASHA(
        record_path=str(sweep_dir / EARLY_STOPS_FILE),
        time_attr=TIME_ATTR,
        metric=metric,
        mode=mode,
        max_t=max_epochs,
        grace_period=a.grace_period,
        reduction_factor=a.reduction_factor,
        brackets=a.brackets,
    )
