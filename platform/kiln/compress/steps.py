"""Running one compression step: input artifact folder -> output artifact folder(s).

Every output is an artifact that loads without unpickling: safetensors + spec.json (with the
layer shapes of a pruned network) or ONNX + spec.json.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln import tracking as trk
from kiln.compress.config import (
    CompressJobConfig,
    DistillStep,
    PruneStep,
    QuantizeStep,
    UnstructuredPruneStep,
)
from kiln.compress.plan import build_student, student_spec
from kiln.data.dataset import PreparedData
from kiln.errors import ConfigError
from kiln.models.artifact import build_model, load_spec, load_torch_model, save_artifact
from kiln.models.builders import count_parameters
from kiln.models.spec import ModelSpec


@dataclass
class Made:
    """A variant a step produced (not yet evaluated or registered)."""

    name: str
    kind: str
    input: str
    directory: Path
    run_id: str
    params: dict[str, Any]
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class StepContext:
    cfg: CompressJobConfig
    data: PreparedData
    work_dir: Path
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    debug: bool = False
    say: Callable[[str], None] = lambda text: None
    child_runs: list[str] = field(
        default_factory=list
    )  # every MLflow run started, to close them on failure


def step_params(step) -> dict[str, Any]:
    """The step's settings as plain data (logged as params, tagged on the registry version)."""
    return step.model_dump(mode="json", exclude={"name", "input"})


def child_run(ctx: StepContext, name: str, kind: str, params: dict[str, Any]) -> str:
    run_id = trk.start_run(
        ctx.tracking_uri,
        ctx.experiment_id,
        f"compress-{name}",
        {trk.TAG_JOB: "compress", "kiln.variant": kind, "kiln.variant_name": name},
        parent_run_id=ctx.parent_run_id,
    )
    ctx.child_runs.append(run_id)
    trk.log_params(ctx.tracking_uri, run_id, trk.flatten(params))
    return run_id


def variant_spec(
    base: ModelSpec, name: str, kind: str, parent: str, params: dict[str, Any]
) -> ModelSpec:
    spec = copy.deepcopy(base)
    spec.variant = {
        **{k: v for k, v in (base.variant or {}).items() if k == "structure"},
        "name": name,
        "kind": kind,
        "parent": parent,
        "step": params,
    }
    return spec


def structured(step: PruneStep, input_dir: Path, ctx: StepContext, where: str) -> list[Made]:
    from kiln.compress.finetune import StartFrom, step_config, train_variant
    from kiln.compress.prune import structured_prune
    from kiln.models.structure import record_structure

    started = time.perf_counter()
    params = step_params(step)
    run_id = child_run(ctx, step.variant, step.kind, params)
    model, spec = load_torch_model(input_dir)
    pruned = structured_prune(model, spec.input_shape, step, where)
    out_spec = variant_spec(spec, step.variant, step.kind, step.input, params)
    out_spec.variant.pop("structure", None)
    out_spec.variant["structure"] = record_structure(pruned, build_model(out_spec))
    out = ctx.work_dir / step.variant
    before, after = count_parameters(model), count_parameters(pruned)
    epochs = ctx.cfg.train.epochs if step.epochs is None else step.epochs
    ctx.say(
        f"  {step.variant}: {before:,} -> {after:,} parameters; "
        f"fine-tuning {epochs} epoch(s) on Ray Train"
    )
    if epochs > 0:
        train_variant(
            step_config(ctx.cfg, epochs, step.lr),
            ctx.data,
            out_spec,
            out,
            ctx.tracking_uri,
            run_id,
            start=StartFrom(out_spec, pruned),
            debug=ctx.debug,
        )
    else:
        save_artifact(pruned, out_spec, out)
    return [
        Made(
            step.variant,
            step.kind,
            step.input,
            out,
            run_id,
            params,
            time.perf_counter() - started,
            extra={"params_before": before, "params_after": after},
        )
    ]


def unstructured(
    step: UnstructuredPruneStep, input_dir: Path, ctx: StepContext, where: str
) -> list[Made]:
    from kiln.compress.prune import unstructured_prune

    started = time.perf_counter()
    params = step_params(step)
    run_id = child_run(ctx, step.variant, step.kind, params)
    model, spec = load_torch_model(input_dir)
    pruned, sparsity = unstructured_prune(model, step, where)
    out = save_artifact(
        pruned,
        variant_spec(spec, step.variant, step.kind, step.input, params),
        ctx.work_dir / step.variant,
    )
    note = (
        f"{100 * sparsity.fraction:.1f}% of Conv/Linear weights are zero, stored densely: "
        "no size or speed gain is claimed (a dense runtime multiplies the zeros too)"
    )
    return [
        Made(
            step.variant,
            step.kind,
            step.input,
            out,
            run_id,
            params,
            time.perf_counter() - started,
            extra={"sparsity": round(sparsity.fraction, 4)},
            notes=[note],
        )
    ]


def quantized(step: QuantizeStep, input_dir: Path, ctx: StepContext, where: str) -> list[Made]:
    from kiln.compress.quantize import calibration_rows, quantize_onnx, quantized_op_count
    from kiln.models.onnx_artifact import export_onnx_model, save_onnx_artifact

    started = time.perf_counter()
    params = step_params(step)
    run_id = child_run(ctx, step.variant, step.kind, params)
    model, spec = load_torch_model(input_dir)
    calibration = (
        calibration_rows(
            ctx.data.x_train,
            step.calibration_samples,
            ctx.cfg.train.seed,
            where,
            ctx.data.sizes()["train"],
        )
        if step.mode == "static"
        else None
    )
    int8 = quantize_onnx(export_onnx_model(model, spec.input_shape), step, calibration)
    if quantized_op_count(int8) == 0:
        raise ConfigError(
            f"config key '{where}': {step.mode} int8 quantization found nothing to quantize in "
            "this model"
        )
    out_spec = variant_spec(spec, step.variant, step.kind, step.input, params)
    out_spec.variant.pop("structure", None)  # the ONNX graph holds the shapes
    out_spec.variant["param_count"] = count_parameters(model)
    out = save_onnx_artifact(int8, out_spec, ctx.work_dir / step.variant)
    notes = []
    if step.mode == "dynamic":
        notes.append(
            "dynamic int8 quantizes only Linear (MatMul/Gemm) weights; convolutions stay fp32"
        )
    return [
        Made(
            step.variant,
            step.kind,
            step.input,
            out,
            run_id,
            params,
            time.perf_counter() - started,
            notes=notes,
        )
    ]


def distilled(step: DistillStep, input_dir: Path, ctx: StepContext, where: str) -> list[Made]:
    """The distilled student and, with the same architecture, budget and seed, a plain cross-entropy
    student.

    Both are Ray Train jobs; they run side by side when the cluster can place both at once.
    """
    from concurrent.futures import ThreadPoolExecutor

    from kiln.compress.distill import DistillationLoss
    from kiln.compress.finetune import step_config, train_variant
    from kiln.ray_connection import placeable_slots

    params = step_params(step)
    teacher_spec = load_spec(input_dir)
    base = student_spec(step, teacher_spec, where)
    student_params = count_parameters(build_student(base, ctx.data, where))
    epochs = ctx.cfg.train.epochs if step.epochs is None else step.epochs
    cfg = step_config(ctx.cfg, epochs, step.lr)
    jobs = []
    for name, kind, loss in [
        (step.variant, "distill", DistillationLoss(input_dir, step.temperature, step.alpha)),
        (f"{step.variant}_ce", "distill_ce", None),
    ]:
        what = "distilled from " + step.input if loss else "plain cross-entropy baseline"
        ctx.say(
            f"  {name}: student {step.student.name} ({student_params:,} parameters), {what}, "
            f"{epochs} epoch(s) on Ray Train"
        )
        jobs.append(
            (
                name,
                kind,
                loss,
                child_run(ctx, name, kind, params),
                variant_spec(base, name, kind, step.input, params),
            )
        )

    def train(job) -> Made:
        name, kind, loss, run_id, spec = job
        started = time.perf_counter()
        out = train_variant(
            cfg,
            ctx.data,
            spec,
            ctx.work_dir / name,
            ctx.tracking_uri,
            run_id,
            loss=loss,
            debug=ctx.debug,
        )
        notes = (
            []
            if loss
            else [
                f"same student, budget and seed as '{step.variant}', trained on labels only (what "
                "distillation adds)"
            ]
        )
        return Made(
            name, kind, step.input, out, run_id, params, time.perf_counter() - started, notes=notes
        )

    t = cfg.train
    side_by_side = (
        placeable_slots({"CPU": t.cpus_per_worker, **({"GPU": 1.0} if t.use_gpu else {})})
        >= 2 * t.workers
    )
    if not side_by_side:
        return [train(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="kiln-distill") as pool:
        return [f.result() for f in [pool.submit(train, job) for job in jobs]]


StepRunner = Callable[[Any, Path, StepContext, str], list[Made]]
RUNNERS: dict[str, StepRunner] = {
    "prune": structured,
    "unstructured_prune": unstructured,
    "quantize": quantized,
    "distill": distilled,
}


def run_step(step, index: int, input_dir: Path, ctx: StepContext) -> list[Made]:
    """Run one step on the artifact in ``input_dir``; returns the variants it made (artifacts in
    ctx.work_dir)."""
    return RUNNERS[step.kind](step, input_dir, ctx, f"compress.steps.{index}")
