"""The monitor of one served version: observes each request's normalized input and logits (cheap:
scores and a ring-buffer append), and evaluates drift, OOD rate and alerts on a window snapshot,
called off the event loop every ``eval_every`` rows or ``eval_interval_s`` seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.monitor.live.alerts import Alert, Threshold, notify
from kiln.monitor.live.config import MonitorConfig
from kiln.monitor.live.window import RowWindow
from kiln.monitor.reference import MonitorReference
from kiln.monitor.reference.features import input_features, ood_scores, output_features
from kiln.monitor.reference.stats import DriftResult, drift, prepare


@dataclass
class OodResult:
    """Per-row OOD scores and flags of one request (flag: the score is below the calibrated
    threshold)."""

    scores: np.ndarray
    flags: np.ndarray
    threshold: float

    def parameters(self) -> dict[str, Any]:
        """The response's ``parameters`` entries: one list item per input row."""
        return {
            "ood": self.flags.tolist(),
            "ood_score": np.round(self.scores, 5).tolist(),
            "ood_threshold": round(self.threshold, 6),
        }


@dataclass(frozen=True)
class Snapshot:
    """A copy of the window to evaluate, and how many rows had been observed when it was taken
    (which of two snapshots is the newer)."""

    rows: np.ndarray
    flags: np.ndarray
    seen: int


@dataclass
class Evaluation:
    """One evaluation of the window: drift (None below ``min_rows``), OOD rate, alerts it raised."""

    at: float
    rows: int
    ood_rate: float
    drift: DriftResult | None
    alerts: list[Alert] = field(default_factory=list)
    seen: int = 0  # rows observed when its snapshot was taken

    @property
    def drift_score(self) -> float | None:
        return self.drift.score if self.drift else None


class VersionMonitor:
    """Live monitoring of one served version against its reference."""

    def __init__(
        self,
        model: str,
        version: str,
        reference: MonitorReference,
        cfg: MonitorConfig,
        on_alert: Callable[[Alert], None] | None = None,
    ):
        self.model, self.version, self.reference, self.cfg = model, version, reference, cfg
        self.kind = reference.kind
        self.threshold = reference.threshold(cfg.ood_score, cfg.ood_inputs, cfg.ood_pass_rate)
        self.scorer = reference.scorer(cfg.ood_score, cfg.ood_inputs)
        self.n_inputs = sum(f.source == "input" for f in reference.features)
        self.window = RowWindow(cfg.window, len(reference.features))
        self.layout = [f.spec for f in reference.features]
        self.statistics = prepare(reference)
        self.drift_alert = Threshold("drift", cfg.drift_threshold, cfg.hysteresis)
        self.ood_alert = Threshold("ood_rate", cfg.ood_rate_threshold, cfg.hysteresis)
        self.on_alert = on_alert or (
            lambda alert: notify(alert, cfg.webhook, cfg.webhook_timeout_s)
        )
        self.flagged = 0  # rows flagged OOD since start
        self.last: Evaluation | None = None
        self.alerts: list[Alert] = []  # the most recent alert events
        self._new_rows = 0
        self._last_eval = time.monotonic()
        self._evaluating = threading.Lock()

    # --- the request path -------------------------------------------------------------------

    def observe(self, x: np.ndarray, logits: np.ndarray, probs: np.ndarray) -> OodResult:
        """Score one request's rows and append them to the window. ``probs`` is the softmax of
        ``logits``, which the request computed once for its answer."""
        inputs = input_features(self.kind, x)
        scores = self.scorer.score(ood_scores(logits, probs)[self.cfg.ood_score], inputs)
        flags = scores < self.threshold
        row = np.concatenate([inputs, output_features(logits, probs, self.kind)], axis=1)
        self.window.append(row, flags)
        self.flagged += int(flags.sum())
        self._new_rows += len(flags)
        return OodResult(scores, flags, self.threshold)

    @property
    def behind(self) -> bool:
        """Whether rows arrived that the latest evaluation does not cover (an evaluation queued
        on the monitor thread may not have run yet)."""
        return self.window.seen > (self.last.seen if self.last is not None else 0)

    def due(self) -> bool:
        """Whether enough new rows (or time with new rows) passed to evaluate again."""
        if self._new_rows == 0 or self._evaluating.locked():
            return False
        return (
            self._new_rows >= self.cfg.eval_every
            or time.monotonic() - self._last_eval >= self.cfg.eval_interval_s
        )

    def take_snapshot(self) -> Snapshot:
        """The window to evaluate (taken on the request path's thread, so the buffer is never read
        mid-append)."""
        self._new_rows, self._last_eval = 0, time.monotonic()
        return Snapshot(*self.window.snapshot(), seen=self.window.seen)

    # --- off the event loop -----------------------------------------------------------------

    def evaluate(self, snapshot: Snapshot | None = None) -> Evaluation | None:
        """Drift and OOD rate of the window, with alert transitions (notified through
        ``on_alert``). None for a snapshot older than the latest evaluation's: evaluations run in
        order on the monitor thread, and one out of order must neither replace a newer result nor
        move the alerts back."""
        snapshot = snapshot if snapshot is not None else self.take_snapshot()
        rows, flags = snapshot.rows, snapshot.flags
        with self._evaluating:
            if self.last is not None and self.last.seen > snapshot.seen:
                return None
            result = None
            if len(rows) >= self.cfg.min_rows:
                result = drift(self.statistics, rows, self.cfg.psi_threshold, self.cfg.ks_alpha)
            rate = float(flags.mean()) if len(flags) else 0.0
            evaluation = Evaluation(
                at=time.time(), rows=int(len(rows)), ood_rate=rate, drift=result, seen=snapshot.seen
            )
            if result is not None:
                self._transition(
                    evaluation, self.drift_alert, result.score, {"drifted": result.drifted}
                )
            if len(rows) >= self.cfg.min_rows:
                self._transition(evaluation, self.ood_alert, rate, {})
            self.last = evaluation
        return evaluation

    def _transition(
        self, evaluation: Evaluation, tracker: Threshold, value: float, details: dict
    ) -> None:
        state = tracker.update(value)
        if state is None:
            return
        alert = Alert(
            self.model,
            self.version,
            tracker.signal,
            state,
            float(value),
            tracker.threshold,
            details=details,
        )
        evaluation.alerts.append(alert)
        self.alerts = [*self.alerts[-19:], alert]
        self.on_alert(alert)

    # --- what others read -------------------------------------------------------------------

    def signals(self) -> dict[str, float]:
        """{"drift": score, "ood_rate": rate} of the latest evaluation, what rollout gates read; {}
        until the window holds ``min_rows`` (no data: a gate holds rather than judging a handful of
        rows)."""
        last = self.last
        if last is None or last.drift is None:
            return {}
        return {"drift": last.drift.score, "ood_rate": last.ood_rate}

    def status(self) -> dict[str, Any]:
        """The monitor's state as JSON: thresholds, window, latest drift (per feature), alerts."""
        last = self.last
        return {
            "model": self.model,
            "version": self.version,
            "monitored": True,
            "kind": self.kind,
            "window": {
                "capacity": self.cfg.window,
                "rows": len(self.window),
                "seen": self.window.seen,
            },
            "ood": {
                "score": self.cfg.ood_score,
                "inputs": self.cfg.ood_inputs,
                "threshold": self.threshold,
                "pass_rate": self.cfg.ood_pass_rate,
                "window_rate": None if last is None else last.ood_rate,
                "flagged_total": self.flagged,
                "alert_threshold": self.cfg.ood_rate_threshold,
                "alerting": self.ood_alert.firing,
            },
            "drift": {
                "threshold": self.cfg.drift_threshold,
                "psi_threshold": self.cfg.psi_threshold,
                "ks_alpha": self.cfg.ks_alpha,
                "alerting": self.drift_alert.firing,
                "alerting_since": self.drift_alert.since,
                **(
                    last.drift.to_dict()
                    if last is not None and last.drift is not None
                    else {"score": None, "drifted": [], "features": []}
                ),
            },
            "evaluated_at": None if last is None else last.at,
            "alerts": [a.to_dict() for a in self.alerts],
        }

    def window_rows(self) -> dict[str, Any]:
        """The window's rows per feature (for reports)."""
        rows, flags = self.window.snapshot()
        return {
            "features": [f.name for f in self.layout],
            "rows": rows.tolist(),
            "ood": flags.tolist(),
        }
