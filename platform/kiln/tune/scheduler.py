"""ASHA early stopping that records which trials it stopped, and at which epoch.

Ray Tune does not say why a trial ended, and a resumed sweep starts from a fresh copy of the
scheduler, so every stop decision is appended to a JSON file in the sweep's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from kiln.files import atomic_write_json
from kiln.tune.trial import TIME_ATTR

EARLY_STOPS_FILE = "early_stops.json"


def read_early_stops(path: str | Path) -> dict[str, int]:
    """``{trial_id: epochs it had trained}`` for every trial ASHA stopped (empty when none)."""
    try:
        return {k: int(v) for k, v in json.loads(Path(path).read_text()).items()}
    except (OSError, ValueError):
        return {}


def record_early_stop(path: str | Path, trial_id: str, epochs_done: int) -> None:
    """Add one early stop to the file at ``path`` (atomically: a killed driver leaves the old or
    the new file, never half of one)."""
    stops = read_early_stops(path)
    stops[trial_id] = epochs_done
    atomic_write_json(path, stops, indent=1, sort_keys=True)


class RecordingASHA(AsyncHyperBandScheduler):
    """AsyncHyperBandScheduler (ASHA) that writes each early stop to ``record_path``.

    It keeps its own copies of ``time_attr`` and ``max_t``: ASHA has no public accessor for them.
    """

    def __init__(self, record_path: str, time_attr: str, max_t: int, **kwargs: Any):
        super().__init__(time_attr=time_attr, max_t=max_t, **kwargs)
        self.record_path = record_path
        self.time_attr = time_attr
        self.max_t = max_t

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        decision: str = super().on_trial_result(tune_controller, trial, result)
        done = result.get(self.time_attr)
        if decision == TrialScheduler.STOP and done is not None and done < self.max_t:
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
