"""The sweep's MLflow runs: a parent run, and a nested child run per trial that the driver writes.

Trials only report to Ray Tune; ``SweepRuns``, a Tune callback in the driver, turns each report
into the trial's per-epoch metrics. Tune restores its callbacks from the pickled sweep on a
resume, so a child run is found again by its trial-id tag rather than kept in memory.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ray.tune import Callback

from kiln import tracking as trk
from kiln.tune.config import EPOCH_METRICS, MODEL_MEASURES, TuneJobConfig
from kiln.tune.space import Dimension, apply_params, decode_params, train_config_dict
from kiln.tune.trial import TIME_ATTR, trial_number

TAG_SWEEP = "kiln.tune.sweep_run_id"
TAG_TRIAL_ID = "kiln.tune.trial_id"
TAG_TRIAL_NUMBER = "kiln.tune.trial"
EPOCH_KEYS = (*EPOCH_METRICS, "lr", "samples_per_s", "epoch_seconds")


def start_parent_run(
    cfg, tracking_uri: str, experiment_id: str, dataset_hash: str, sweep_dir: Path
) -> str:
    """The sweep's run: tags, the config as params (the space as JSON) and config.yaml. Returns its
    id."""
    from kiln.version import __version__ as kiln_version

    tags = {
        trk.TAG_JOB: "tune",
        trk.TAG_DATASET_HASH: dataset_hash,
        trk.TAG_CODE_VERSION: trk.code_version(),
        trk.TAG_KILN_VERSION: kiln_version,
        trk.TAG_DATA_SOURCE: cfg.data.source,
        "kiln.tune.sweep_dir": str(sweep_dir),
        "kiln.config_json": json.dumps(cfg.to_dict(), sort_keys=True),
    }
    run_id = trk.start_run(tracking_uri, experiment_id, f"sweep-{sweep_dir.name}", tags)
    params = trk.flatten(train_config_dict(cfg))
    tune_params = trk.flatten(
        cfg.require_tune().model_dump(mode="json", exclude={"space"}), "tune."
    )
    params.update(
        {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in tune_params.items()}
    )
    params.update({f"tune.space.{k}": json.dumps(v) for k, v in cfg.require_tune().space.items()})
    trk.log_params(tracking_uri, run_id, params)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(cfg.to_yaml())
        trk.log_artifact(tracking_uri, run_id, path)
    return run_id


def child_runs(tracking_uri: str, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """``{trial_id: child run id}`` of a sweep."""
    runs = trk.search_runs(tracking_uri, experiment_id, f"tags.`{TAG_SWEEP}` = '{parent_run_id}'")
    return {r.data.tags[TAG_TRIAL_ID]: r.info.run_id for r in runs if TAG_TRIAL_ID in r.data.tags}


def log_epoch(tracking_uri: str, run_id: str, epoch: int, metrics: dict[str, Any]) -> None:
    """One epoch's metrics at step = epoch, the way the training loop logs a train run's epochs."""
    values = {k: metrics[k] for k in EPOCH_KEYS if isinstance(metrics.get(k), (int, float))}
    trk.log_metrics(tracking_uri, run_id, values, step=epoch)
    trk.log_metrics(tracking_uri, run_id, {"epoch": epoch}, step=epoch)


class SweepRuns(Callback):
    """Tune callback (driver side): a child run per trial with its params, attempts and epochs."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        base_config: dict[str, Any],
        schema: type[TuneJobConfig],
        dims: list[Dimension],
        dataset_hash: str,
    ):
        self.tracking_uri, self.experiment_id, self.parent_run_id = (
            tracking_uri,
            experiment_id,
            parent_run_id,
        )
        self.base_config, self.schema, self.dims, self.dataset_hash = (
            base_config,
            schema,
            dims,
            dataset_hash,
        )
        self._runs: dict[str, str] = {}
        self._logged: dict[str, set[int]] = {}  # epochs already on each run

    def __getstate__(self):
        return {**self.__dict__, "_runs": {}, "_logged": {}}  # read back from MLflow after a resume

    def run_id(self, trial) -> str:
        """The trial's child run, created (with its params) on first use."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        runs = trk.search_runs(
            self.tracking_uri,
            self.experiment_id,
            f"tags.`{TAG_SWEEP}` = '{self.parent_run_id}' and "
            f"tags.`{TAG_TRIAL_ID}` = '{trial.trial_id}'",
        )
        if runs:
            run_id = runs[0].info.run_id
        else:
            from kiln.config import validate_config

            number = trial_number(trial.experiment_tag)
            values = decode_params(self.dims, trial.config)
            cfg = validate_config(apply_params(self.base_config, values), self.schema)
            tags = {
                TAG_SWEEP: self.parent_run_id,
                TAG_TRIAL_ID: trial.trial_id,
                TAG_TRIAL_NUMBER: str(number),
                trk.TAG_JOB: "tune-trial",
                trk.TAG_DATASET_HASH: self.dataset_hash,
                trk.TAG_DATA_SOURCE: cfg.data.source,
                **{f"kiln.tune.param.{k}": v for k, v in values.items()},
            }
            run_id = trk.start_run(
                self.tracking_uri,
                self.experiment_id,
                f"trial-{number:04d}",
                tags,
                parent_run_id=self.parent_run_id,
            )
            trk.log_params(self.tracking_uri, run_id, trk.flatten(cfg.to_dict()))
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        attempt = len(trk.metric_history(self.tracking_uri, run_id, "trial_attempt")) + 1
        trk.log_metrics(self.tracking_uri, run_id, {"trial_attempt": attempt}, step=attempt)
        done = (trial.last_result or {}).get(TIME_ATTR)
        if attempt > 1 and done:
            trk.log_metrics(self.tracking_uri, run_id, {"resumed_at_epoch": done}, step=done)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.run_id(trial)
        epoch = int(result[TIME_ATTR]) - 1
        if run_id not in self._logged:
            self._logged[run_id] = {
                int(m.step) for m in trk.metric_history(self.tracking_uri, run_id, "epoch")
            }
        if epoch in self._logged[run_id]:
            return  # reported again by a trial restored after its last report (at-least-once)
        log_epoch(self.tracking_uri, run_id, epoch, result)
        self._logged[run_id].add(epoch)
        if epoch == 0:
            measures = {
                k: result[k] for k in MODEL_MEASURES if isinstance(result.get(k), (int, float))
            }
            trk.log_metrics(self.tracking_uri, run_id, measures)
