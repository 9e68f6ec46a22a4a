"""The ``tune:`` section: search space, objectives, search algorithm, ASHA, trial resources.

Only the form of the section is checked here. Whether each searched key is a real train-config
key that accepts the searched values needs the whole config: ``kiln.tune.space.check_space``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kiln.config import Section
from kiln.errors import ConfigError
from kiln.train.config import TrainingJobConfig
from kiln.train.metrics import EPOCH_METRICS  # what ASHA and the objectives can act on

# Measures of the trial's model, constant over its epochs.
MODEL_MEASURES = ("params", "latency_ms")
DEFAULT_MODES = {
    "val_accuracy": "max",
    "val_f1_macro": "max",
    "val_loss": "min",
    "train_loss": "min",
    "params": "min",
    "latency_ms": "min",
}

ObjectiveMetric = Literal[
    "val_accuracy", "val_f1_macro", "val_loss", "train_loss", "params", "latency_ms"
]


class Objective(Section):
    metric: ObjectiveMetric = Field(
        default="val_accuracy",
        description="What to optimize: a validation metric of the "
        "last epoch, 'params' (parameter count) or 'latency_ms' (batch-1 CPU latency).",
    )
    mode: Literal["max", "min"] = Field(
        default="max", description="Whether higher or lower is better."
    )


class AshaConfig(Section):
    metric: Literal["val_accuracy", "val_f1_macro", "val_loss", "train_loss"] | None = Field(
        default=None,
        description="Metric ASHA compares at each rung; default the first per-epoch objective.",
    )
    grace_period: int = Field(
        default=1, ge=1, description="Epochs every trial gets before it can be stopped."
    )
    reduction_factor: float = Field(
        default=2.0, gt=1, description="Keep the top 1/reduction_factor of trials at each rung."
    )
    brackets: int = Field(
        default=1, ge=1, description="ASHA brackets (1 = plain successive halving)."
    )


class TuneConfig(Section):
    """A sweep over train-config keys. Trials train ``max_epochs`` epochs unless ASHA stops them."""

    name: str | None = Field(
        default=None,
        description="Sweep name (folder prefix under run_dir/sweeps); default experiment.name.",
    )
    space: dict[str, Any] = Field(
        ...,
        description="Dotted train-config key -> {loguniform|uniform|int: [low, high]} "
        "or {choice: [values]}.",
    )
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective()],
        min_length=1,
        max_length=3,
        description="One objective, or several for a Pareto front.",
    )
    searcher: Literal["tpe", "random"] = Field(
        default="tpe", description="Optuna's TPE sampler, or random sampling."
    )
    seed: int = Field(default=0, description="Seed of the sampler.")
    startup_trials: int = Field(
        default=4, ge=1, description="Random trials before TPE starts modelling the space."
    )
    num_samples: int = Field(
        default=12,
        ge=1,
        description="Trials to run (with budget_epochs: the most trials the budget may start).",
    )
    budget_epochs: int | None = Field(
        default=None,
        ge=1,
        description="Budget in trial epochs: trials keep starting until the sweep's trials have "
        "trained this many epochs in all (those still running then are stopped), so the epochs "
        "ASHA saves go to more trials; null: num_samples trials.",
    )
    max_concurrent_trials: int | None = Field(
        default=None,
        ge=1,
        description="Trials running at once; default as many as the cluster can place.",
    )
    time_budget_s: float | None = Field(
        default=None, gt=0, description="Stop the sweep (and its running trials) after this."
    )
    max_epochs: int | None = Field(
        default=None,
        ge=1,
        description="Epochs of a trial that is not stopped; default train.epochs.",
    )
    asha: AshaConfig | None = Field(
        default_factory=AshaConfig, description="ASHA early stopping; null turns it off."
    )
    trial_workers: int = Field(
        default=1,
        ge=1,
        description="Workers per trial; 1 trains inside the trial itself, more: the trial is "
        "rank 0 of a DDP group with that many ranks (a Ray Train run on GPUs).",
    )
    cpus_per_worker: float = Field(
        default=0.5, gt=0, description="CPUs per trial worker (fractions allowed)."
    )
    gpus_per_worker: float = Field(default=0.0, ge=0, description="GPUs per trial worker.")
    trial_max_failures: int = Field(
        default=1,
        ge=0,
        description="Times a failed trial is restarted from its last checkpoint (its process "
        "killed, its node lost) before it counts as failed; 0 = never.",
    )

    @field_validator("space")
    @classmethod
    def _space_is_well_formed(cls, space: dict[str, Any]) -> dict[str, Any]:
        from kiln.tune.space import parse_space

        parse_space(space)  # raises ConfigError naming the key
        return space

    @model_validator(mode="after")
    def _objectives_are_distinct(self) -> TuneConfig:
        metrics = [o.metric for o in self.objectives]
        if len(set(metrics)) != len(metrics):
            raise ConfigError(
                f"config key 'tune.objectives': each metric at most once (got {metrics})"
            )
        if (
            self.asha is not None
            and self.asha.metric is None
            and not any(m in EPOCH_METRICS for m in metrics)
        ):
            raise ConfigError(
                "config key 'tune.asha': no objective is a per-epoch metric; set tune.asha.metric "
                "or tune.asha: null"
            )
        return self

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def primary(self) -> Objective:
        return self.objectives[0]

    def asha_metric(self) -> tuple[str, str]:
        """(metric, mode) that ASHA compares at its rungs."""
        if self.asha is not None and self.asha.metric is not None:
            metric = self.asha.metric
            mode = next(
                (o.mode for o in self.objectives if o.metric == metric), DEFAULT_MODES[metric]
            )
            return metric, mode
        first = next(o for o in self.objectives if o.metric in EPOCH_METRICS)
        return first.metric, first.mode


class TuneJobConfig(TrainingJobConfig):
    """The sections a sweep reads: the training sections and ``tune``."""

    tune: TuneConfig | None = Field(
        default=None, description="A tuning sweep over the keys above (kiln tune)."
    )

    def require_tune(self) -> TuneConfig:
        """The ``tune:`` section. Raises ConfigError when the config has none."""
        if self.tune is None:
            raise ConfigError(
                "the config has no 'tune:' section; kiln tune needs one "
                "(see configs/tune/digits_cnn.yaml)"
            )
        return self.tune
