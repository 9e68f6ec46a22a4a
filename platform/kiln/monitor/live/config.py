"""The ``serve.monitor`` config section: window, drift and OOD thresholds, alerting, and the
retraining policy (``serve.monitor.retrain``: settings only; the loop that acts on them is
``kiln.monitor.retrain``, above serving)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator

from kiln.config import Section


class RolloutPolicy(Section):
    """How the retrained version is rolled out (``kiln rollout start`` options; its fields are
    the parameters of ``kiln.rollout.core.spec.options_for``)."""

    strategy: Literal["canary", "linear", "blue-green", "shadow"] = Field(
        "canary", description="Rollout strategy."
    )
    weight: float | None = Field(
        10.0,
        gt=0,
        le=100,
        description="canary: percent of requests to the new version; shadow: percent mirrored.",
    )
    steps: list[float] | None = Field(None, description="linear: percent per step.")
    bake_s: float = Field(300.0, gt=0, description="Time at each step with every gate passing.")
    interval_s: float = Field(10.0, gt=0, description="Gate evaluation interval.")
    gates: list[str] = Field(
        default_factory=lambda: ["error_rate<0.01", "drift<0.3"],
        description="Gates on the new version's live metrics and monitoring signals.",
    )


class RetrainPolicy(Section):
    """``serve.monitor.retrain``: retrain a served model when its drift stays above the
    threshold."""

    config: str = Field(
        description="Training config of the retraining job (a path inside `project`)."
    )
    data_source: str | None = Field(
        None,
        description="The data to retrain on (`data.source` of the job); default: the config's.",
    )
    overrides: list[str] = Field(
        default_factory=list, description="More key=value overrides for the job."
    )
    after_s: float = Field(
        300.0,
        gt=0,
        description="Drift must stay above serve.monitor.drift_threshold this "
        "long (its alert firing) before a job is submitted.",
    )
    cooldown_s: float = Field(
        3600.0, gt=0, description="At most one retraining job per version this often."
    )
    jobs_address: str | None = Field(
        None,
        description="Ray Jobs API (http://HOST:8265) the job goes to; "
        "default: the cluster that serves.",
    )
    project: str | None = Field(
        None,
        description="Project folder shipped with the job (holds jobs/ and the "
        "config); default: the folder `kiln serve start` ran in.",
    )
    python: str | None = Field(
        None, description="Python of the job on the head; default: the replica's."
    )
    job_timeout_s: float = Field(
        3600.0, gt=0, description="Give up following the job after this long."
    )
    rollout: RolloutPolicy | None = Field(
        default_factory=RolloutPolicy,
        description="Roll the new version out with these gates (null: only register it).",
    )

    @field_validator("overrides")
    @classmethod
    def _key_values(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if "=" not in v]
        if bad:
            raise ValueError(f"overrides must be key=value, got {bad[0]!r}")
        return value


class MonitorConfig(Section):
    """Live monitoring of every served version over a sliding window of its most recent input
    rows."""

    enabled: bool = Field(
        True,
        description="Monitor served versions (versions registered without a monitor "
        "reference are not monitored; `kiln monitor status` says so).",
    )
    window: int = Field(
        500, ge=20, le=100_000, description="Rows in the sliding window drift is computed on."
    )
    min_rows: int = Field(
        100, ge=10, description="Rows the window needs before a drift score is computed."
    )
    eval_every: int = Field(50, ge=1, description="Recompute drift after this many new rows ...")
    eval_interval_s: float = Field(
        5.0, gt=0, description="... or after this many seconds with new rows."
    )
    psi_threshold: float = Field(
        0.2, gt=0, description="A feature drifts when its PSI is at least this ..."
    )
    ks_alpha: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="... and its KS (chi-square for categories) p-value is below this.",
    )
    drift_threshold: float = Field(
        0.3,
        gt=0,
        le=1,
        description="Alert when the drift score (share of monitored "
        "features that drift) exceeds this.",
    )
    ood_score: Literal["energy", "msp"] = Field(
        "energy",
        description="Per-row OOD score: 'energy' (logsumexp of the "
        "logits) or 'msp' (maximum softmax probability).",
    )
    ood_inputs: bool = Field(
        True,
        description="Also score how typical each row's input features are (catches "
        "inputs a model is confidently wrong on, such as noise images).",
    )
    ood_pass_rate: float = Field(
        0.95,
        gt=0,
        lt=1,
        description="Share of validation rows whose score passes the calibrated OOD threshold.",
    )
    ood_rate_threshold: float = Field(
        0.2, gt=0, le=1, description="Alert when the window's OOD rate exceeds this."
    )
    hysteresis: float = Field(
        0.8,
        gt=0,
        le=1,
        description="An alert clears when its value falls below "
        "hysteresis x threshold (one alert per crossing).",
    )
    # A secret (such URLs often carry a token): shown and logged as '**********', never in a
    # status, a log line, or a run's params and tags (to_dict / model_dump(mode="json")).
    webhook_url: SecretStr | None = Field(
        None, description="POST a JSON body here on every alert and recovery (kept secret)."
    )
    webhook_timeout_s: float = Field(3.0, gt=0, description="Timeout of one webhook call.")
    retrain: RetrainPolicy | None = Field(
        None, description="Retrain when drift stays above its threshold (off when absent)."
    )

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("webhook_url is not an http(s) URL")
        return value

    @property
    def webhook(self) -> str | None:
        """The webhook URL itself (only for the call)."""
        return None if self.webhook_url is None else self.webhook_url.get_secret_value()
