"""Monitoring metrics per served version, exported in Prometheus format through Ray's metrics agent
(Ray prefixes ``ray_``): drift score, OOD rate, per-feature PSI, rows scored and flagged, alerts."""

from __future__ import annotations

from typing import Any

from kiln.monitor.live.alerts import AlertState

# Ray 2.60 annotates ``tag_keys`` as ``Tuple[str]`` (one element) though it takes any number.
TagKeys = Any


class MonitorMetrics:
    """The monitoring metric objects of one replica (Ray Serve adds the replica's tags)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge

        tags: TagKeys = ("model", "model_version")
        self.drift = Gauge(
            "kiln_monitor_drift_score",
            description="Share of monitored features that drift in the live window (0..1).",
            tag_keys=tags,
        )
        self.ood_rate = Gauge(
            "kiln_monitor_ood_rate",
            description="Share of the live window's rows flagged out-of-distribution.",
            tag_keys=tags,
        )
        self.feature_psi = Gauge(
            "kiln_monitor_feature_psi",
            description="PSI of one monitored feature, live window against the training reference.",
            tag_keys=tags + ("feature",),
        )
        self.alerting = Gauge(
            "kiln_monitor_alerting",
            description="1 while an alert on the signal is firing.",
            tag_keys=tags + ("signal",),
        )
        self.rows = Counter(
            "kiln_monitor_rows", description="Rows scored by the monitor.", tag_keys=tags
        )
        self.ood_rows = Counter(
            "kiln_monitor_ood_rows", description="Rows flagged out-of-distribution.", tag_keys=tags
        )
        self.alerts = Counter(
            "kiln_monitor_alerts", description="Alerts fired.", tag_keys=tags + ("signal",)
        )

    def observed(self, model: str, version: str, rows: int, flagged: int) -> None:
        tags = {"model": model, "model_version": version}
        self.rows.inc(rows, tags=tags)
        if flagged:
            self.ood_rows.inc(flagged, tags=tags)

    def evaluated(self, model: str, version: str, evaluation, monitor) -> None:
        """After an evaluation: the gauges, and the alerts it fired."""
        self.publish(model, version, evaluation, monitor)
        for alert in evaluation.alerts:
            if alert.state == AlertState.FIRING:
                self.alerts.inc(
                    1, tags={"model": model, "model_version": version, "signal": alert.signal}
                )

    def publish(self, model: str, version: str, evaluation, monitor) -> None:
        """Set the gauges from an evaluation (again: called every second, see
        ReplicaMonitors._watch)."""
        tags = {"model": model, "model_version": version}
        self.ood_rate.set(evaluation.ood_rate, tags=tags)
        if evaluation.drift is not None:
            self.drift.set(evaluation.drift.score, tags=tags)
            for f in evaluation.drift.features:
                self.feature_psi.set(f.psi, tags={**tags, "feature": f.name})
        for tracker in (monitor.drift_alert, monitor.ood_alert):
            self.alerting.set(
                1.0 if tracker.firing else 0.0, tags={**tags, "signal": tracker.signal}
            )
