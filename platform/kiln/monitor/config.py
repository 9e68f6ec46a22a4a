"""The ``serve.monitor`` config section: window, drift and OOD thresholds, alerting."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from kiln.config import Section
from kiln.monitor.retrain import RetrainPolicy


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
    webhook_url: str | None = Field(
        None, description="POST a JSON body here on every alert and recovery."
    )
    webhook_timeout_s: float = Field(3.0, gt=0, description="Timeout of one webhook call.")
    retrain: RetrainPolicy | None = Field(
        None, description="Retrain when drift stays above its threshold (off when absent)."
    )

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"'{value}' is not an http(s) URL")
        return value


def resolve_retrain(cfg: MonitorConfig, cwd: str | None = None) -> None:
    """Pin ``retrain.project`` to an absolute folder (replicas run elsewhere) and check that the
    retraining config is a file in it. Raises ConfigError naming the key."""
    import os
    from pathlib import Path

    from kiln.errors import ConfigError

    policy = cfg.retrain
    if policy is None:
        return
    project = Path(policy.project or cwd or os.getcwd()).expanduser().resolve()
    if not (project / "jobs" / "train.py").is_file():
        raise ConfigError(
            f"config key 'serve.monitor.retrain.project': {project} has no jobs/train.py "
            "(the retraining job); set it to the Kiln project folder"
        )
    config = Path(policy.config).expanduser()
    config = (config if config.is_absolute() else project / config).resolve()
    if not config.is_file():
        raise ConfigError(f"config key 'serve.monitor.retrain.config': {config} does not exist")
    try:
        relative = config.relative_to(project)
    except ValueError:
        raise ConfigError(
            f"config key 'serve.monitor.retrain.config': {config} is outside the project folder "
            f"{project}, so the job would not get it"
        ) from None
    policy.project, policy.config = str(project), relative.as_posix()
    if policy.rollout is not None:
        from kiln.errors import KilnError

        try:
            policy.rollout.options().plan(policy.rollout.strategy)
        except KilnError as exc:
            raise ConfigError(f"config key 'serve.monitor.retrain.rollout': {exc}") from None
