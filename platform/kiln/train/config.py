"""The ``train`` config section, and the sections a training job reads (``TrainingJobConfig``).

``TrainingJobConfig`` is what the training loop needs (experiment, data, model, train); the full
``kiln.schema.KilnConfig`` extends it with one section per later job kind, so every layer below the
schema is typed against the part of the config it reads.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from kiln.config import ExperimentConfig, Section
from kiln.data.config import DataConfig
from kiln.models.config import ModelConfig


class CheckpointConfig(Section):
    every: int = Field(
        default=1, ge=1, description="Save a checkpoint every N epochs (and after the last)."
    )
    keep: int = Field(default=2, ge=1, description="Keep the best K checkpoints by `metric`.")
    metric: str = Field(default="val_f1_macro", description="Metric that ranks checkpoints.")
    mode: Literal["max", "min"] = Field(
        default="max", description="Whether a higher or lower `metric` is better."
    )


class TrainDataConfig(Section):
    prefetch_batches: int = Field(
        default=1,
        ge=0,
        le=64,
        description="Batches prepared ahead of the training step (Ray Data iter_torch_batches); "
        "above 1 Ray Data formats batches in a thread pool that does not keep their order, so a "
        "resumed epoch is no longer identical.",
    )
    shuffle_buffer: int = Field(
        default=10_000,
        ge=0,
        le=10_000_000,
        description="Rows in the seeded local shuffle buffer each epoch (0: no shuffle).",
    )
    cache: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Keep the preprocessed train/val splits in Ray's object store across epochs: "
        "'auto' when they take under a quarter of it, 'always' (spilling to disk), 'never': "
        "re-read and decode every epoch.",
    )


class TrainConfig(Section):
    epochs: int = Field(default=10, ge=1, description="Training epochs.")
    batch_size: int = Field(
        default=64, ge=1, description="Global batch size, split across workers."
    )
    lr: float = Field(default=1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="Weight decay.")
    optimizer: Literal["adamw", "adam", "sgd"] = Field(default="adamw", description="Optimizer.")
    scheduler: Literal["cosine", "none"] = Field(
        default="cosine", description="Learning-rate schedule over the epochs."
    )
    workers: int = Field(default=1, ge=1, description="Ray Train workers (data-parallel replicas).")
    use_gpu: bool = Field(default=False, description="One GPU per worker, NCCL backend.")
    cpus_per_worker: float = Field(
        default=1.0, gt=0, description="CPUs reserved per worker (fractions allowed)."
    )
    seed: int = Field(default=0, description="Seed for weights, shuffling and dropout.")
    class_weights: Literal["none", "auto"] = Field(
        default="none",
        description="'auto' weights the loss by inverse class frequency of the train split.",
    )
    sampler: Literal["none", "oversample", "undersample"] = Field(
        default="none",
        description="Rebalance the train split each epoch: repeat minority or drop majority rows.",
    )
    max_failures: int = Field(
        default=2, ge=0, description="Worker-group restarts allowed before the run fails."
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    data: TrainDataConfig = Field(default_factory=TrainDataConfig)


class TrainingJobConfig(Section):
    """The sections a training job reads; ``kiln.schema.KilnConfig`` adds the later job kinds."""

    experiment: ExperimentConfig = Field(
        # (a lambda: mypy cannot see that ExperimentConfig's fields all have defaults)
        default_factory=lambda: ExperimentConfig.model_validate({})
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _model_kwargs_match_builder(self) -> TrainingJobConfig:
        from kiln.models.registry import (
            check_builder_kwargs,
        )  # imports the builder's module on demand

        check_builder_kwargs(self.model.name, self.model.kwargs)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what is logged and what reproduces the run)."""
        return self.model_dump(mode="json", exclude_none=False)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def training_sections(cfg: TrainingJobConfig) -> dict[str, Any]:
    """Only the sections a training job reads, as plain data (what Ray Train workers validate)."""
    return cfg.model_dump(mode="json", include=set(TrainingJobConfig.model_fields))
