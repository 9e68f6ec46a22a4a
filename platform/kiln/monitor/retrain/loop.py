"""Closing the loop: when a served version's drift alert has been firing for ``after_s``, submit a
retraining job through the same path as ``kiln submit train`` (Ray Jobs API) on the configured data
source, follow it to its end, and start a gated rollout of the version it registered
(``kiln.rollout.control.api.start_rollout``, trigger ``monitor``).

Each step is an event (``RetrainEvent``): logged, written to the model's rollout audit log, kept in
the monitor status, and POSTed to the webhook. One job at a time per version, at most one per
``cooldown_s``. With several replicas, the submission id is derived from the model, the version and
the cooldown period, so the replicas that cross the threshold in the same period submit one job (the
Jobs API refuses a second job with that id).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError, first_line
from kiln.monitor.live.config import RetrainPolicy
from kiln.rollout.core.spec import options_for
from kiln.rollout.core.store import RolloutStore

logger = logging.getLogger("kiln.monitor")


@dataclass
class RetrainEvent:
    """One step of the loop: triggered, submitted, succeeded, failed, registered, rollout."""

    model: str
    version: str
    step: str
    at: float = field(default_factory=time.time)
    submission_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.detail.items())
        job = f" job {self.submission_id}" if self.submission_id else ""
        return (
            f"kiln monitor retrain [{self.step}]: model {self.model} version {self.version}:{job} "
            f"{extra}"
        ).rstrip()


class RetrainLoop:
    """The retraining policy of one served version (``check`` is called periodically off the event
    loop). The class itself is the replicas' retrainer factory
    (``kiln.monitor.live.served.RetrainerFactory``), handed to them by the commands layer."""

    def __init__(
        self,
        policy: RetrainPolicy,
        model: str,
        version: str,
        registry_name: str,
        tracking_uri: str,
        run_dir: str | None = None,
        on_event: Callable[[RetrainEvent], None] | None = None,
        default_jobs_address: str | None = None,
    ):
        self.policy, self.model, self.version = policy, model, version
        self.registry_name, self.tracking_uri = registry_name, tracking_uri
        self.run_dir = run_dir  # the serving run dir: rollout state and audit log
        self.on_event = on_event or (lambda event: None)
        # The serving cluster's Jobs API (captured by `kiln serve start`) if the policy names none.
        self.default_jobs_address = default_jobs_address
        self.events: list[RetrainEvent] = []
        self.in_flight: str | None = None
        self.last_submitted: float | None = None

    def due(self, alert_since: float | None, now: float | None = None) -> bool:
        """Whether the drift alert that fires since ``alert_since`` calls for a job now."""
        now = time.time() if now is None else now
        if (
            alert_since is None
            or self.in_flight is not None
            or now - alert_since < self.policy.after_s
        ):
            return False
        return self.last_submitted is None or now - self.last_submitted >= self.policy.cooldown_s

    def check(self, alert_since: float | None, drift_score: float | None) -> None:
        """Start a retraining job (on a thread of its own) if one is due."""
        if alert_since is None or not self.due(alert_since):
            return
        self.in_flight = "starting"
        self.last_submitted = time.time()
        self._emit(
            "triggered",
            None,
            {
                "drift": round(drift_score or 0.0, 4),
                "firing_s": round(time.time() - alert_since, 1),
            },
        )
        threading.Thread(target=self._run, daemon=True, name=f"kiln-retrain-{self.model}").start()

    def submission_id(self) -> str:
        period = int(time.time() // self.policy.cooldown_s)
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in self.model)
        return f"kiln-retrain-{safe}-v{self.version}-{period}"

    def job_overrides(self) -> list[str]:
        """The job's overrides: the registered model's name (the new version joins it), the data
        source."""
        out = [f"experiment.name={self.registry_name}"]
        if self.policy.data_source:
            out.append(f"data.source={self.policy.data_source}")
        return out + list(self.policy.overrides)

    def _run(self) -> None:
        try:
            outcome = self.run_job()
        except Exception as exc:  # the loop reports (an event); serving goes on
            self._emit(
                "failed",
                self.in_flight if self.in_flight != "starting" else None,
                {"error": f"{type(exc).__name__}: {first_line(exc) if str(exc) else ''}"},
            )
        else:
            if outcome is not None and self.policy.rollout is not None:
                try:
                    self.roll_out(outcome.summary["model_uri"], outcome.submission_id)
                except Exception as exc:  # reported as an event, as above
                    self._emit(
                        "failed", outcome.submission_id, {"error": f"rollout: {first_line(exc)}"}
                    )
        finally:
            self.in_flight = None

    def run_job(self):
        """Submit the job, wait for it, record the version it registered. Returns its JobOutcome
        (None when it did not succeed or a sibling replica submitted it). Raises KilnError on
        submission errors."""
        from kiln.cluster.client import connect
        from kiln.cluster.jobs import job_outcome, wait_until_finished
        from kiln.cluster.submit import build_runtime_env, job_spec, submit

        policy = self.policy
        spec = job_spec(
            "train",
            str(Path(policy.project or os.getcwd()) / policy.config),
            self.job_overrides(),
            policy.project,
            policy.python or sys.executable,
        )
        jobs_address = policy.jobs_address or self.default_jobs_address
        if not jobs_address:
            raise KilnError(
                "the serving cluster has no dashboard (Jobs API); set "
                "serve.monitor.retrain.jobs_address"
            )
        client = connect(jobs_address)
        submission_id = self.submission_id()
        try:
            submit(client, spec, build_runtime_env(spec, self.tracking_uri), submission_id)
        except KilnError as exc:
            if "has a job with that id already" in str(exc):  # another replica submitted it
                self._emit("skipped", submission_id, {"reason": "submitted by another replica"})
                return None
            raise
        self.in_flight = submission_id
        self._emit(
            "submitted",
            submission_id,
            {"entrypoint": spec.entrypoint(), "data_source": policy.data_source or "(config's)"},
        )
        wait_until_finished(client, submission_id, timeout=policy.job_timeout_s, poll=2.0)
        outcome = job_outcome(client, submission_id)
        if (
            outcome.status != "SUCCEEDED"
            or not outcome.summary
            or "model_uri" not in outcome.summary
        ):
            self._emit(
                "failed", submission_id, {"status": outcome.status, "error": outcome.error or ""}
            )
            return None
        self._emit(
            "registered",
            submission_id,
            {
                "model_uri": outcome.summary["model_uri"],
                "test_accuracy": outcome.summary.get("metrics", {}).get("test_accuracy"),
            },
        )
        return outcome

    def roll_out(self, model_uri: str, submission_id: str) -> None:
        """Start the gated rollout of the registered version (the rollout controller takes it from
        there)."""
        from kiln.rollout.control.api import start_rollout

        if not self.run_dir:
            raise KilnError("no serving run dir to keep the rollout's state in")
        version = model_uri.rsplit("/", 1)[1]
        policy = self.policy.rollout
        if policy is None:
            raise KilnError("no rollout policy (serve.monitor.retrain.rollout is null)")
        record = start_rollout(
            self.run_dir,
            None,
            self.model,
            version,
            policy.strategy,
            options_for(**policy.model_dump()),  # the policy's fields are its parameters
            trigger="monitor",
        )
        self._emit(
            "rollout",
            submission_id,
            {
                "to_version": record.candidate,
                "strategy": record.strategy,
                "gates": ",".join(record.gates),
            },
        )

    def _emit(self, step: str, submission_id: str | None, detail: dict[str, Any]) -> None:
        event = RetrainEvent(
            self.model, self.version, step, submission_id=submission_id, detail=detail
        )
        self.events = [*self.events[-49:], event]
        (logger.warning if step == "failed" else logger.info)(event.line())
        if self.run_dir:  # every step of the loop in the model's rollout audit log
            try:
                RolloutStore(self.run_dir, self.model).audit(
                    {
                        "decision": f"retrain-{step}",
                        "trigger": "monitor",
                        "version": self.version,
                        "submission_id": submission_id,
                        "reason": event.line(),
                        "detail": detail,
                    }
                )
            except OSError:
                logger.exception("kiln monitor: could not write the rollout audit log")
        try:
            self.on_event(event)
        except Exception:  # a broken handler must not stop the loop; it is logged
            logger.exception("kiln monitor: retrain event handler failed")
