"""Checking the steps before anything runs, so that a step that cannot work fails at once.

Each step is tried on a stand-in for its input (the reference itself, or the architecture an
earlier step will produce, with untrained weights): structured pruning really prunes it,
quantization checks the layers it needs, distillation builds its student. A failure is a
ConfigError naming the step; nothing has been trained or registered yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kiln.compress.config import (
    REFERENCE,
    CompressConfig,
    DistillStep,
    PruneStep,
    QuantizeStep,
    UnstructuredPruneStep,
)
from kiln.compress.prune import structured_prune, unstructured_prune
from kiln.compress.quantize import calibration_rows
from kiln.data.dataset import PreparedData
from kiln.errors import ConfigError, first_line
from kiln.models.spec import ModelSpec

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class StandIn:
    """What a step's input will be: its format and, for torch formats, a model of the same
    structure."""

    format: str
    model: nn.Module | None


def step_key(i: int, step) -> str:
    return f"compress.steps.{i}"


def student_spec(step: DistillStep, reference: ModelSpec, where: str) -> ModelSpec:
    """The student's spec (architecture + arguments from the step). ConfigError for a bad
    student."""
    from kiln.models.registry import check_builder_kwargs

    try:
        check_builder_kwargs(step.student.name, step.student.kwargs)
    except ConfigError as exc:
        raise ConfigError(
            f"config key '{where}.student': {str(exc).replace('config key ', '')}"
        ) from None
    return ModelSpec(
        architecture=step.student.name,
        kwargs=step.student.kwargs,
        input_shape=list(reference.input_shape),
        labels=list(reference.labels),
        preprocessing=reference.preprocessing,
    )


def build_student(spec: ModelSpec, data: PreparedData, where: str) -> nn.Module:
    """The student with fresh weights, checked to take this data and output one logit per class."""
    from kiln.models.artifact import build_model

    try:
        model = build_model(
            spec, [spec.architecture]
        ).eval()  # named by the config, not an artifact
        with torch.no_grad():
            out = model(torch.from_numpy(data.x_train[:2]))
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"config key '{where}.student': model '{spec.architecture}' cannot take this data "
            f"(input {spec.input_shape}): {first_line(exc)}"
        ) from None
    if tuple(out.shape[1:]) != (spec.num_classes,):
        raise ConfigError(
            f"config key '{where}.student': outputs {list(out.shape)}, expected [batch, "
            f"{spec.num_classes}]"
        )
    return model


def needs_torch(stand_in: StandIn, step, where: str) -> nn.Module:
    if stand_in.model is None:
        raise ConfigError(
            f"config key '{where}': {step.kind} does not apply to '{step.input}', a "
            f"{stand_in.format} "
            "model; it needs a torch model (apply it before quantizing)"
        )
    return stand_in.model


def check_steps(
    cc: CompressConfig, reference: StandIn, spec: ModelSpec, data: PreparedData
) -> None:
    """Raise ConfigError for the first step that cannot run on what its input will be."""
    stand_ins = {REFERENCE: reference}
    for i, step in enumerate(cc.steps):
        where = step_key(i, step)
        source = stand_ins[step.input]
        if isinstance(step, PruneStep):
            model = needs_torch(source, step, where)
            stand_ins[step.variant] = StandIn(
                "safetensors", structured_prune(model, spec.input_shape, step, where)
            )
        elif isinstance(step, UnstructuredPruneStep):
            model = needs_torch(source, step, where)
            stand_ins[step.variant] = StandIn(
                "safetensors", unstructured_prune(model, step, where)[0]
            )
        elif isinstance(step, QuantizeStep):
            model = needs_torch(source, step, where)
            has_linear = any(isinstance(m, nn.Linear) for m in model.modules())
            has_conv = any(isinstance(m, CONV) for m in model.modules())
            if step.mode == "dynamic" and not has_linear:
                raise ConfigError(
                    f"config key '{where}': dynamic int8 quantization does not apply to this "
                    "model: "
                    "it quantizes Linear layers and the model has none (use mode: static)"
                )
            if step.mode == "static":
                if not (has_conv or has_linear):
                    raise ConfigError(
                        f"config key '{where}': static int8 quantization does not apply to this "
                        "model "
                        "(no Conv or Linear layers)"
                    )
                calibration_rows(
                    data.x_train, step.calibration_samples, 0, where, data.sizes()["train"]
                )
            stand_ins[step.variant] = StandIn("onnx", None)
        elif isinstance(step, DistillStep):
            student = build_student(student_spec(step, spec, where), data, where)
            stand_ins[step.variant] = stand_ins[f"{step.variant}_ce"] = StandIn(
                "safetensors", student
            )
