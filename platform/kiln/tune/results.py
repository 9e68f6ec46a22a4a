"""What a sweep found: one summary per trial, the best trial, the Pareto front.

Trials are ranked on the values of their last epoch. A trial that ASHA stopped early trained
fewer epochs than the others, so the best trial and the front are chosen among trials that
trained every epoch (when there are any), so that ``best.yaml`` reproduces what it reports.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.train.report import failure_line
from kiln.tune.config import EPOCH_METRICS, MODEL_MEASURES, Objective
from kiln.tune.space import Dimension, decode_params
from kiln.tune.trial import TIME_ATTR

COMPLETED = "completed"
STOPPED_EARLY = "stopped_early"  # by ASHA
STOPPED_BY_BUDGET = "stopped_by_budget"  # tune.time_budget_s or tune.budget_epochs ran out
INTERRUPTED = "interrupted"  # the driver was stopped; --resume continues it
STOPPED = "stopped"  # Ray Tune ended it early for another reason
FAILED = "failed"
NOT_STARTED = "not_started"
SUMMARY_METRICS = (*EPOCH_METRICS, *MODEL_MEASURES)


@dataclass
class TrialSummary:
    number: int
    trial_id: str
    status: str
    epochs: int
    params: dict[str, Any] = field(default_factory=dict)  # config values, by dotted key
    metrics: dict[str, float] = field(default_factory=dict)  # of the last epoch
    history: list[dict[str, float]] = field(
        default_factory=list
    )  # per epoch: epochs_done, metrics, reported_at
    encoded_params: dict[str, Any] = field(default_factory=dict)  # as Optuna stores them
    checkpoint: str | None = None
    error: str | None = None
    run_id: str | None = None  # MLflow child run

    def values(self, objectives: list[Objective]) -> list[float] | None:
        """Objective values, or None when one is missing."""
        vals: list[float] = []
        for o in objectives:
            value = self.metrics.get(o.metric)
            if value is None or not math.isfinite(value):
                return None
            vals.append(float(value))
        return vals

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("encoded_params")
        return data


def _trial_identity(result) -> tuple[int, str]:
    """(number, trial id) from the trial folder name ``trial_0003_<id>`` (see
    trial.trial_dirname)."""
    name = Path(str(result.path)).name
    parts = name.split("_")
    if len(parts) >= 3 and parts[0] == "trial" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return 0, str((result.metrics or {}).get("trial_id", name))


def _error_line(error: BaseException | None) -> str | None:
    return None if error is None else failure_line(error, limit=300)


def _history(result) -> list[dict[str, float]]:
    df = result.metrics_dataframe
    if df is None or TIME_ATTR not in getattr(df, "columns", []):
        return []
    keep = [
        c
        for c in (TIME_ATTR, *EPOCH_METRICS, "epoch_seconds", "samples_per_s", "reported_at")
        if c in df.columns
    ]
    rows = df[keep].dropna(subset=[TIME_ATTR]).to_dict("records")
    by_epoch = {
        int(row[TIME_ATTR]): {k: float(v) for k, v in row.items() if v == v} for row in rows
    }
    return [
        by_epoch[e] for e in sorted(by_epoch)
    ]  # a restored trial may report its last epoch again


def _checkpoint_path(result) -> str | None:
    if result.checkpoint is not None:
        return str(result.checkpoint.path)
    path = (result.metrics or {}).get("checkpoint_path")  # a Ray Train run inside the trial
    return str(path) if path else None


def summarize(
    results,
    dims: list[Dimension],
    max_epochs: int,
    early_stops: dict[str, int],
    budget_hit: bool,
    child_runs: dict[str, str],
    unfinished: set[str],
) -> list[TrialSummary]:
    """One TrialSummary per trial of a Ray Tune ResultGrid, ordered by trial number.

    ``unfinished``: ids of trials Ray Tune would still run on a resume (pending, running, paused).
    """
    trials = []
    for result in results:
        number, trial_id = _trial_identity(result)
        metrics = result.metrics or {}
        encoded = dict(metrics.get("config") or {})
        epochs = int(metrics.get(TIME_ATTR, 0) or 0)
        if result.error is not None:
            status = FAILED
        elif epochs >= max_epochs:
            status = COMPLETED
        elif trial_id in early_stops:
            status = STOPPED_EARLY
        elif budget_hit:
            status = STOPPED_BY_BUDGET if epochs else NOT_STARTED
        elif trial_id in unfinished:
            status = INTERRUPTED
        else:
            status = NOT_STARTED if not epochs else STOPPED
        trials.append(
            TrialSummary(
                number=number,
                trial_id=trial_id,
                status=status,
                epochs=epochs,
                params=decode_params(dims, encoded) if encoded else {},
                encoded_params=encoded,
                metrics={
                    k: float(metrics[k])
                    for k in SUMMARY_METRICS
                    if isinstance(metrics.get(k), (int, float))
                },
                history=_history(result),
                checkpoint=_checkpoint_path(result),
                error=_error_line(result.error),
                run_id=child_runs.get(trial_id),
            )
        )
    return sorted(trials, key=lambda t: t.number)


def dominates(a: list[float], b: list[float], modes: list[str]) -> bool:
    """True when ``a`` is at least as good as ``b`` in every objective and better in one."""
    better = False
    for x, y, mode in zip(a, b, modes, strict=True):
        if mode == "min":
            x, y = -x, -y
        if x < y:
            return False
        if x > y:
            better = True
    return better


def ranked_candidates(
    trials: list[TrialSummary], objectives: list[Objective]
) -> list[TrialSummary]:
    """Trials that can be best: those with every objective value, preferring trials that ran every
    epoch."""
    scored = [t for t in trials if t.values(objectives) is not None and t.status != FAILED]
    completed = [t for t in scored if t.status == COMPLETED]
    return completed or scored


def pareto_front(trials: list[TrialSummary], objectives: list[Objective]) -> list[TrialSummary]:
    """The candidates no other candidate dominates, ordered by the first objective (best first)."""
    # ranked_candidates keeps only trials with every objective value
    scored = [(t, v) for t in ranked_candidates(trials, objectives) if (v := t.values(objectives))]
    modes: list[str] = [o.mode for o in objectives]
    front = [
        (t, v)
        for t, v in scored
        if not any(dominates(other_v, v, modes) for other, other_v in scored if other is not t)
    ]
    # Identical objective values: keep the earliest trial only.
    unique: dict[tuple[float, ...], TrialSummary] = {}
    for t, v in sorted(front, key=lambda tv: tv[0].number):
        unique.setdefault(tuple(v), t)
    return sort_by_objective(list(unique.values()), objectives[0])


def sort_by_objective(trials: list[TrialSummary], objective: Objective) -> list[TrialSummary]:
    """Best first on ``objective``; trials without a value last; ties by trial number."""
    sign = -1.0 if objective.mode == "max" else 1.0

    def key(t: TrialSummary):
        v = t.metrics.get(objective.metric)
        return (v is None, sign * v if v is not None else 0.0, t.number)

    return sorted(trials, key=key)


def pick_best(trials: list[TrialSummary], objectives: list[Objective]) -> TrialSummary | None:
    """The best trial: on the only objective, or the front member best on the first objective."""
    if len(objectives) > 1:
        front = pareto_front(trials, objectives)
        return front[0] if front else None
    cands = sort_by_objective(ranked_candidates(trials, objectives), objectives[0])
    return cands[0] if cands else None


def count(trials: list[TrialSummary], status: str) -> int:
    return sum(t.status == status for t in trials)


@dataclass
class SweepResult:
    """What a finished sweep produced (the CLI's ``--json`` line is ``to_dict()``)."""

    run_id: str
    sweep_dir: str
    tracking_uri: str
    objectives: list[dict[str, str]]
    trials: list[TrialSummary]
    best: TrialSummary | None
    front: list[TrialSummary]
    best_config_path: str | None
    best_config: dict[str, Any] | None
    model_uri: str | None
    front_model_uris: dict[int, str] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    resumed: bool = False
    kept_from_before: int = 0  # trials that had ended before a resume (not run again)
    lineage: dict[str, Any] = field(default_factory=dict)  # warm start, growth (sweep.json)

    @property
    def stopped_early(self) -> int:
        return sum(t.status == STOPPED_EARLY for t in self.trials)

    def to_dict(self) -> dict[str, Any]:
        multi = len(self.objectives) > 1
        best = self.best
        out: dict[str, Any] = {
            "sweep_run_id": self.run_id,
            "sweep_dir": self.sweep_dir,
            "tracking_uri": self.tracking_uri,
            "objectives": self.objectives,
            "trials": len(self.trials),
            "stopped_early": self.stopped_early,
            "statuses": {
                s: sum(t.status == s for t in self.trials)
                for s in sorted({t.status for t in self.trials})
            },
            "best_trial": best.number if best else None,
            "best_params": best.params if best else None,
            "best_metrics": best.metrics if best else None,
            "best_config": self.best_config,
            "best_config_path": self.best_config_path,
            "model_uri": self.model_uri,
            "test_metrics": self.test_metrics,
            "resumed": self.resumed,
            "kept_from_before": self.kept_from_before,
            "lineage": self.lineage,
            "plots": self.plots,
            "trial_results": [
                {
                    "trial": t.number,
                    "status": t.status,
                    "epochs": t.epochs,
                    "params": t.params,
                    "metrics": t.metrics,
                    "run_id": t.run_id,
                }
                for t in self.trials
            ],
        }
        if multi:
            out["front"] = [
                {
                    "trial": t.number,
                    "params": t.params,
                    "values": dict(
                        zip(
                            [o["metric"] for o in self.objectives],
                            [t.metrics.get(o["metric"]) for o in self.objectives],
                            strict=True,
                        )
                    ),
                    "model_uri": self.front_model_uris.get(t.number),
                }
                for t in self.front
            ]
        return out
