"""The ``compress`` config section: which model to start from, the steps, and how to pick a
candidate.

Each step makes one variant (a distillation step makes two: the distilled student and the
plain cross-entropy student it is compared with). A step starts from the reference model or
from an earlier step's variant (``input``), so steps compose: distill, then prune, then quantize.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from kiln.config import Section
from kiln.errors import ConfigError
from kiln.models.config import ModelConfig
from kiln.train.config import TrainingJobConfig

REFERENCE = "reference"


class StepBase(Section):
    name: str | None = Field(
        default=None, description="Variant name (unique); default: derived from the kind."
    )
    input: str = Field(
        default=REFERENCE,
        description="'reference' or the name of an earlier step whose variant this step starts "
        "from.",
    )

    @property
    def variant(self) -> str:
        """The name of the variant this step makes: ``name``, which CompressConfig fills in with
        the kind's default when the config leaves it out."""
        if self.name is None:
            raise ConfigError("config key 'compress.steps': a step has no name")
        return self.name


class FineTune(Section):
    """Training settings of a step that trains (structured pruning's fine-tune, distillation)."""

    epochs: int | None = Field(
        default=None,
        ge=0,
        description="Epochs; default: train.epochs (0 skips fine-tuning after pruning).",
    )
    lr: float | None = Field(
        default=None, gt=0, description="Peak learning rate; default: train.lr."
    )


class PruneStep(StepBase, FineTune):
    """Structured channel pruning with Torch-Pruning's DepGraph: the network physically shrinks."""

    kind: Literal["prune"]
    ratio: float = Field(
        default=0.5,
        gt=0.0,
        lt=1.0,
        description="Fraction of channels removed (per layer, or over all layers when scope is "
        "global).",
    )
    scope: Literal["layer", "global"] = Field(
        default="layer",
        description="'layer': each layer loses `ratio` of its channels; 'global': channels ranked "
        "across layers.",
    )
    layer_ratios: dict[str, float] = Field(
        default_factory=dict,
        description="Per-layer ratios by module name (e.g. {'3': 0.3}), overriding `ratio`.",
    )
    importance: Literal["l1", "l2"] = Field(
        default="l2",
        description="Channel importance: L1 or L2 norm of the channel group's weights.",
    )
    round_to: int | None = Field(
        default=None,
        ge=1,
        description="Keep channel counts a multiple of this (friendlier to vectorized kernels).",
    )
    epochs: int | None = Field(
        default=3, ge=0, description="Fine-tuning epochs after pruning (a Ray Train job; 0: none)."
    )

    @model_validator(mode="after")
    def _ratios_in_range(self) -> PruneStep:
        for layer, r in self.layer_ratios.items():
            if not 0.0 <= r < 1.0:
                raise ValueError(f"layer_ratios['{layer}'] must be in [0, 1), got {r}")
        return self


class UnstructuredPruneStep(StepBase):
    """Magnitude pruning (torch.nn.utils.prune): zeroes weights, changes neither size nor speed of a
    dense model."""

    kind: Literal["unstructured_prune"]
    amount: float = Field(
        default=0.5,
        gt=0.0,
        lt=1.0,
        description="Fraction of weights of Conv/Linear layers set to zero.",
    )
    scope: Literal["layer", "global"] = Field(
        default="global", description="Rank weights per layer or over all layers together."
    )


class QuantizeStep(StepBase):
    """int8 post-training quantization with ONNX Runtime (static QDQ with calibration, or
    dynamic)."""

    kind: Literal["quantize"]
    mode: Literal["static", "dynamic"] = Field(
        default="static",
        description="'static': weights and activations int8, calibrated; 'dynamic': Linear "
        "weights int8, activations quantized at run time.",
    )
    calibration_samples: int = Field(
        default=256,
        ge=1,
        description="Rows of the train split used to calibrate activation ranges (static only).",
    )
    per_channel: bool = Field(
        default=True, description="One scale per output channel of each weight (static only)."
    )
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(
        default="minmax",
        description="How activation ranges are estimated from the calibration set.",
    )


class DistillStep(StepBase, FineTune):
    """Knowledge distillation (Hinton et al. 2015) into a smaller student, trained beside a plain CE
    student."""

    kind: Literal["distill"]
    student: ModelConfig = Field(
        description="The student architecture: `name` plus builder arguments (e.g. {name: cnn, "
        "width: 8})."
    )
    temperature: float = Field(
        default=4.0, gt=0, description="Softmax temperature T of teacher and student logits."
    )
    alpha: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Weight of the soft (teacher) loss; 1 - alpha weighs the hard-label "
        "cross-entropy.",
    )

    @model_validator(mode="after")
    def _student_arguments(self) -> DistillStep:
        from kiln.models.registry import check_builder_kwargs

        try:
            check_builder_kwargs(self.student.name, self.student.kwargs)
        except ConfigError as exc:
            raise ValueError(
                str(exc)
                .replace("config key 'model.", "key 'student.")
                .replace("config key 'model.name'", "student.name")
            ) from None
        return self


Step = Annotated[
    PruneStep | UnstructuredPruneStep | QuantizeStep | DistillStep, Field(discriminator="kind")
]

DEFAULT_NAMES = {
    "prune": "pruned",
    "unstructured_prune": "sparse",
    "distill": "distilled",
}


def default_step_name(step: PruneStep | UnstructuredPruneStep | QuantizeStep | DistillStep) -> str:
    """The variant name of a step that gives none: from its kind (int8_MODE for quantize)."""
    if isinstance(step, QuantizeStep):
        return f"int8_{step.mode}"
    return DEFAULT_NAMES[step.kind]


class SelectionConfig(Section):
    max_accuracy_drop: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Largest test-accuracy drop (fraction, 0.01 = 1 point) a variant may have to "
        "be picked; unset: no pick.",
    )
    objective: Literal["size", "latency", "throughput"] = Field(
        default="size",
        description="Among qualifying variants pick the smallest, the lowest batch-1 latency, or "
        "the highest throughput.",
    )
    alias: str = Field(default="candidate", description="Registry alias set on the picked variant.")


class BenchmarkConfig(Section):
    rounds: int = Field(
        default=5,
        ge=1,
        description="Rounds of side-by-side timing over all variants (medians are reported).",
    )
    latency_runs: int = Field(default=50, ge=1, description="Batch-1 calls per variant per round.")
    throughput_batch: int = Field(
        default=256, ge=1, description="Batch size of the throughput measurement."
    )
    throughput_runs: int = Field(default=3, ge=1, description="Batches per variant per round.")


class CompressConfig(Section):
    """``compress:`` the model to start from, the steps and the selection rule."""

    model: str | None = Field(
        default=None,
        description="The model to compress: models:/NAME/VERSION, models:/NAME@ALIAS or a train "
        "run id.",
    )
    steps: list[Step] = Field(
        default_factory=list, description="Steps, each making a variant; `input` chains them."
    )
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)

    @model_validator(mode="after")
    def _names_and_inputs(self) -> CompressConfig:
        seen = {REFERENCE}
        for i, step in enumerate(self.steps):
            if step.name is None:
                step.name = default_step_name(step)
            if not step.name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(
                    f"steps[{i}].name '{step.name}' may hold only letters, digits, '_' and '-'"
                )
            if step.input not in seen:
                raise ValueError(
                    f"steps[{i}].input '{step.input}' is neither 'reference' nor an earlier step "
                    f"(earlier: {', '.join(sorted(seen))})"
                )
            names = [step.name] + ([f"{step.name}_ce"] if step.kind == "distill" else [])
            for n in names:
                if n in seen:
                    raise ValueError(
                        f"steps[{i}].name '{n}' is used twice; give each step a unique name"
                    )
                seen.add(n)
        return self


class CompressJobConfig(TrainingJobConfig):
    """The sections a compression job reads: the training sections and ``compress``."""

    compress: CompressConfig | None = Field(
        default=None, description="Post-training compression (kiln compress)."
    )
