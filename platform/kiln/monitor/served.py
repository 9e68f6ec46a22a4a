"""Monitoring inside a ModelServer replica: one VersionMonitor per served version, evaluations on a
thread of their own, metrics, and the JSON the monitor endpoints answer with.

Windows are per replica: with several replicas each keeps the window of the requests it answered
(``kiln monitor status`` shows the replica that answered and says so).
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from kiln.monitor.config import MonitorConfig
from kiln.monitor.monitor import OodResult, VersionMonitor
from kiln.monitor.reference import REFERENCE_FILE, load_reference

logger = logging.getLogger("ray.serve")


class ReplicaMonitors:
    """The monitors of one replica's versions (absent versions: registered without a reference)."""

    def __init__(self, model: str, cfg: MonitorConfig, metrics=None):
        self.model, self.cfg, self.metrics = model, cfg, metrics
        self.monitors: dict[str, VersionMonitor] = {}
        self.unmonitored: dict[str, str] = {}  # version -> why
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"kiln-monitor-{model}")
        self.replica = _replica_id()

    def add(self, version: str, model_dir: Path) -> None:
        if not self.cfg.enabled:
            self.unmonitored[version] = "monitoring is off (serve.monitor.enabled: false)"
            return
        try:
            reference = load_reference(model_dir)
        except (ValueError, KeyError, TypeError) as exc:
            reference, why = None, f"its {REFERENCE_FILE} is unreadable ({exc})"
        else:
            why = f"registered without {REFERENCE_FILE} (re-register it with this Kiln to monitor it)"
        if reference is None:
            self.unmonitored[version] = why
            logger.warning("kiln monitor: model %s version %s is not monitored: %s", self.model, version, why)
            return
        self.monitors[version] = VersionMonitor(self.model, version, reference, self.cfg)

    def observe(self, version: str, x: np.ndarray, logits: np.ndarray) -> OodResult | None:
        """Score a request on the event loop; evaluate on the monitor thread when due."""
        monitor = self.monitors.get(version)
        if monitor is None:
            return None
        result = monitor.observe(x, logits)
        if self.metrics is not None:
            self.metrics.observed(self.model, version, len(result.flags), int(result.flags.sum()))
        if monitor.due():
            snapshot = monitor.take_snapshot()
            asyncio.get_running_loop().run_in_executor(self._pool, self._evaluate, monitor, snapshot)
        return result

    def _evaluate(self, monitor: VersionMonitor, snapshot=None):
        try:
            evaluation = monitor.evaluate(snapshot)
            if self.metrics is not None:
                self.metrics.evaluated(self.model, monitor.version, evaluation, monitor)
            return evaluation
        except Exception:  # monitoring must never take serving down
            logger.exception("kiln monitor: evaluation failed for model %s version %s", self.model, monitor.version)
            return None

    def refresh(self, version: str) -> None:
        """Evaluate now if rows arrived since the last evaluation (for a reader that wants the latest)."""
        monitor = self.monitors.get(version)
        if monitor is not None and monitor._new_rows:
            self._evaluate(monitor, monitor.take_snapshot())

    def signals(self, version: str) -> dict[str, float]:
        monitor = self.monitors.get(version)
        if monitor is None:
            return {}
        self.refresh(version)
        return monitor.signals()

    def status(self, version: str, window: bool = False) -> dict[str, Any]:
        monitor = self.monitors.get(version)
        if monitor is None:
            return {"model": self.model, "version": version, "monitored": False,
                    "reason": self.unmonitored.get(version, "not served")}
        self.refresh(version)
        out = monitor.status()
        if window:
            out["window_rows"] = monitor.window_rows()
            out["reference"] = monitor.reference.to_dict()
        return out

    def report(self, versions: list[str], window: bool = False) -> dict[str, Any]:
        return {"model": self.model, "replica": self.replica, "scope": "replica",
                "config": self.cfg.model_dump(), "versions": {v: self.status(v, window) for v in versions}}


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (in-process tests)
        return f"pid-{os.getpid()}"
