"""Monitoring inside a ModelServer replica: one VersionMonitor per served version, evaluations on a
thread of their own, metrics, and the JSON the monitor endpoints answer with.

Windows are per replica: with several replicas each keeps the window of the requests it answered
(``kiln monitor status`` shows the replica that answered and says so).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kiln.monitor.live.alerts import Alert, notify, post_webhook
from kiln.monitor.live.config import MonitorConfig, RetrainPolicy
from kiln.monitor.live.metrics import MonitorMetrics
from kiln.monitor.live.monitor import Evaluation, OodResult, Snapshot, VersionMonitor
from kiln.monitor.reference import REFERENCE_FILE, load_reference

logger = logging.getLogger("ray.serve")


class RetrainEvent(Protocol):
    """One step of a retraining loop, as the monitor status and the webhook show it."""

    def to_dict(self) -> dict[str, Any]: ...


class Retrainer(Protocol):
    """A served version's retraining loop: what a replica needs of it."""

    policy: RetrainPolicy
    in_flight: str | None
    events: list[Any]  # RetrainEvent-like: each has to_dict()

    def check(self, alert_since: float | None, drift_score: float | None) -> None: ...


class RetrainerFactory(Protocol):
    """Builds the retraining loop of one served version. Supplied from above serving (the commands
    layer hands ``kiln.monitor.retrain.loop.RetrainLoop``): replicas never import retraining, job
    submission or rollout control themselves."""

    def __call__(
        self,
        policy: RetrainPolicy,
        model: str,
        version: str,
        registry_name: str,
        tracking_uri: str,
        run_dir: str | None = None,
        on_event: Callable[[Any], None] | None = None,
        default_jobs_address: str | None = None,
    ) -> Retrainer: ...


class ReplicaMonitors:
    """The monitors of one replica's versions (absent versions: registered without a reference)."""

    def __init__(
        self,
        model: str,
        cfg: MonitorConfig,
        metrics: MonitorMetrics | None = None,
        tracking_uri: str | None = None,
        run_dir: str | None = None,
        stable_version: Callable[[], str | None] | None = None,
        retrainer: RetrainerFactory | None = None,
        jobs_address: str | None = None,
    ):
        self.model, self.cfg, self.metrics, self.tracking_uri = model, cfg, metrics, tracking_uri
        self.run_dir = run_dir
        # The one version whose drift may start a retraining (the stable one; None while a rollout
        # runs, its gates decide then). Without it (no rollouts), every version's drift may.
        self.stable_version = stable_version
        self.retrainer = retrainer  # None: no retraining in this replica (none configured)
        self.jobs_address = jobs_address  # the serving cluster's Jobs API (the policy's default)
        self.monitors: dict[str, VersionMonitor] = {}
        self.loops: dict[str, Retrainer] = {}
        self.unmonitored: dict[str, str] = {}  # version -> why
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"kiln-monitor-{model}")
        # Alerts go out on their own thread: a slow webhook must delay neither requests nor
        # evaluations.
        self._alerts = ThreadPoolExecutor(1, thread_name_prefix=f"kiln-alerts-{model}")
        self.replica = _replica_id()
        self._watcher: threading.Thread | None = None

    def add_retraining(self, version: str, registry_name: str) -> None:
        """Attach the retraining policy to a monitored version; a watcher thread checks it every
        second (time, not traffic, decides when drift has lasted ``after_s``)."""
        policy, cfg = self.cfg.retrain, self.cfg
        if policy is None or self.retrainer is None or version not in self.monitors:
            return

        def post_event(event: RetrainEvent) -> None:  # on the alerts thread: never the caller's
            if cfg.webhook:
                self._alerts.submit(
                    post_webhook,
                    cfg.webhook,
                    {"kind": "kiln.monitor.retrain", **event.to_dict()},
                    cfg.webhook_timeout_s,
                )

        self.loops[version] = self.retrainer(
            policy,
            self.model,
            version,
            registry_name,
            self.tracking_uri or "",
            self.run_dir,
            on_event=post_event,
            default_jobs_address=self.jobs_address,
        )

    def _start_watcher(self) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch, daemon=True, name=f"kiln-monitor-watch-{self.model}"
            )
            self._watcher.start()

    def _watch(self) -> None:
        """Every second: publish the latest gauges again (Ray drops a gauge series that is not
        refreshed within two export intervals, and an idle version is evaluated no more) and check
        the retraining policies."""
        while True:
            time.sleep(1.0)
            for version, monitor in list(self.monitors.items()):
                try:
                    if self.metrics is not None and monitor.last is not None:
                        self.metrics.publish(self.model, version, monitor.last, monitor)
                    loop = self.loops.get(version)
                    if loop is not None and (
                        self.stable_version is None or self.stable_version() == version
                    ):
                        loop.check(
                            monitor.drift_alert.since if monitor.drift_alert.firing else None,
                            monitor.last.drift_score if monitor.last else None,
                        )
                except Exception:  # the watcher must outlive one bad check; it is logged
                    logger.exception(
                        "kiln monitor: periodic check failed for %s v%s", self.model, version
                    )

    def add(self, version: str, model_dir: Path) -> None:
        """Monitor ``version`` against the reference in its artifact folder (or record why not)."""
        if not self.cfg.enabled:
            self.unmonitored[version] = "monitoring is off (serve.monitor.enabled: false)"
            return
        try:
            reference = load_reference(model_dir)
        except (ValueError, KeyError, TypeError) as exc:
            reference, why = None, f"its {REFERENCE_FILE} is unreadable ({exc})"
        else:
            why = (
                f"registered without {REFERENCE_FILE} (re-register it with this Kiln to monitor it)"
            )
        if reference is None:
            self.unmonitored[version] = why
            logger.warning(
                "kiln monitor: model %s version %s is not monitored: %s", self.model, version, why
            )
            return
        cfg = self.cfg

        def on_alert(alert: Alert) -> None:  # on the alerts thread: a slow webhook delays nothing
            self._alerts.submit(notify, alert, cfg.webhook, cfg.webhook_timeout_s)

        self.monitors[version] = VersionMonitor(
            self.model, version, reference, cfg, on_alert=on_alert
        )
        self._start_watcher()

    def remove(self, version: str) -> None:
        """Forget a version that is no longer served (its window, its retraining policy)."""
        self.monitors.pop(version, None)
        self.loops.pop(version, None)
        self.unmonitored.pop(version, None)

    def observe(
        self, version: str, x: np.ndarray, logits: np.ndarray, probs: np.ndarray
    ) -> OodResult | None:
        """Score a request on the event loop (``probs``: the softmax of ``logits``, computed once
        per request by the caller); evaluate on the monitor thread when due. Returns the OOD
        result, None when the version is not monitored."""
        monitor = self.monitors.get(version)
        if monitor is None:
            return None
        result = monitor.observe(x, logits, probs)
        if self.metrics is not None:
            self.metrics.observed(self.model, version, len(result.flags), int(result.flags.sum()))
        if monitor.due():
            snapshot = monitor.take_snapshot()
            asyncio.get_running_loop().run_in_executor(
                self._pool, self._evaluate, monitor, snapshot
            )
        return result

    def _evaluate(
        self, monitor: VersionMonitor, snapshot: Snapshot | None = None
    ) -> Evaluation | None:
        try:
            evaluation = monitor.evaluate(snapshot)
            if evaluation is not None and self.metrics is not None:
                self.metrics.evaluated(self.model, monitor.version, evaluation, monitor)
            return evaluation
        except Exception:  # monitoring must never take serving down
            logger.exception(
                "kiln monitor: evaluation failed for model %s version %s",
                self.model,
                monitor.version,
            )
            return None

    async def refresh(self, version: str) -> None:
        """For a reader that wants the latest: when rows arrived that the latest evaluation does
        not cover, evaluate the window as it is now, on the monitor thread (after the evaluations
        already queued there), and wait for it. The event loop only takes the snapshot: an
        evaluation costs about 1 ms per 1,000 rows of window (BENCHMARKS, Monitoring), which on the
        loop would hold every request of the replica that long."""
        monitor = self.monitors.get(version)
        if monitor is not None and monitor.behind:
            snapshot = monitor.take_snapshot()
            await asyncio.get_running_loop().run_in_executor(
                self._pool, self._evaluate, monitor, snapshot
            )

    async def signals(self, version: str) -> dict[str, float]:
        """The version's rollout-gate signals (``VersionMonitor.signals``) of every row observed
        before the call; {} when unmonitored."""
        monitor = self.monitors.get(version)
        if monitor is None:
            return {}
        await self.refresh(version)
        return monitor.signals()

    async def status(self, version: str, window: bool = False) -> dict[str, Any]:
        """The version's monitor status as JSON (why not, when it is not monitored)."""
        monitor = self.monitors.get(version)
        if monitor is None:
            return {
                "model": self.model,
                "version": version,
                "monitored": False,
                "reason": self.unmonitored.get(version, "not served"),
            }
        await self.refresh(version)
        out = monitor.status()
        loop = self.loops.get(version)
        if loop is not None:
            out["retrain"] = {
                "policy": loop.policy.model_dump(),
                "in_flight": loop.in_flight,
                "events": [e.to_dict() for e in loop.events],
            }
        if window:
            out["window_rows"] = monitor.window_rows()
            out["reference"] = monitor.reference.to_dict()
        return out

    async def report(self, versions: list[str], window: bool = False) -> dict[str, Any]:
        """This replica's monitor report of ``versions`` (what ``GET .../monitor`` answers)."""
        return {
            "model": self.model,
            "replica": self.replica,
            "scope": "replica",
            "config": self.cfg.model_dump(mode="json"),  # secrets as '**********'
            "versions": {v: await self.status(v, window) for v in versions},
        }


def _replica_id() -> str:
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # outside a replica (in-process tests)
        return f"pid-{os.getpid()}"
