"""The compression driver: resolve the model, check every step, run them, evaluate, report,
register, select.

Order matters for clear failure: the model URI, the data and every step are checked before
anything runs; variants are registered only after every step and the evaluation succeeded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln import tracking as trk
from kiln.compress.config import REFERENCE, CompressConfig, CompressJobConfig
from kiln.compress.evaluate import evaluate_artifacts
from kiln.compress.plan import StandIn, check_steps
from kiln.compress.report import VariantReport, compare, format_table, machine_info, write_report
from kiln.compress.select import select_variant
from kiln.compress.steps import Made, StepContext, run_step
from kiln.data.dataset import PreparedData, check_source, prepare_data
from kiln.errors import ConfigError, DataError, KilnError, ModelError, first_line
from kiln.models.registration import register_artifact

BASELINE_ONNX = "reference_onnx"


@dataclass
class SourceModel:
    """The registered model being compressed."""

    uri: str
    name: str
    version: str
    directory: Path
    tags: dict[str, str]


@dataclass
class CompressResult:
    """What ``kiln compress`` produced (its --json line)."""

    run_id: str
    tracking_uri: str
    model_name: str
    source: str
    reference: VariantReport
    baselines: list[VariantReport]
    variants: list[VariantReport]
    selected: str | None
    selected_name: str | None
    selection_message: str
    report: dict[str, str]
    table: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "tracking_uri": self.tracking_uri,
            "model_name": self.model_name,
            "source": self.source,
            "reference": self.reference.to_dict(),
            "baselines": [b.to_dict() for b in self.baselines],
            "variants": [v.to_dict() for v in self.variants],
            "selected": self.selected,
            "selected_name": self.selected_name,
            "selection": self.selection_message,
            "report": self.report,
        }


def resolve_source(tracking_uri: str, uri: str) -> SourceModel:
    """The registry version behind ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or a train run
    id, with its artifact downloaded. Raises ModelError."""
    if uri.startswith("models:/"):
        mv = trk.model_version_for(tracking_uri, uri)
    else:
        run = trk.get_run_or_model_error(trk.client(tracking_uri), uri, uri)
        versions = [
            v for v in trk.client(tracking_uri).search_model_versions(f"run_id='{run.info.run_id}'")
        ]
        if not versions:
            raise ModelError(f"run '{uri}' has no registered model version to compress")
        mv = max(versions, key=lambda v: int(v.version))
    directory = trk.resolve_model_dir(f"models:/{mv.name}/{mv.version}", tracking_uri)
    return SourceModel(
        uri=uri,
        name=mv.name,
        version=str(mv.version),
        directory=directory,
        tags=dict(mv.tags or {}),
    )


def with_model_data(cfg: CompressJobConfig, source: SourceModel) -> CompressJobConfig:
    """``cfg`` with the data section the source version was trained on, when ``cfg`` sets no
    ``data`` of its own and the version recorded one (tag ``kiln.data_config``); else ``cfg``."""
    from kiln.data.config import DataConfig
    from kiln.models.registration import TAG_DATA_CONFIG

    recorded = source.tags.get(TAG_DATA_CONFIG)
    if "data" in cfg.model_fields_set or not recorded:
        return cfg
    try:
        data_cfg = DataConfig.model_validate(json.loads(recorded))
    except (ValueError, TypeError) as exc:
        raise DataError(
            f"data: {source.uri} records a data section Kiln cannot read ({first_line(exc)}); "
            "set data in the config"
        ) from None
    return cfg.model_copy(update={"data": data_cfg})


def check_data(source: SourceModel, data: PreparedData) -> None:
    """The config's data must be the data the model was trained on: otherwise 'test' rows may be
    training rows."""
    from kiln.models.artifact import load_spec

    trained_on = source.tags.get(trk.TAG_DATASET_HASH)
    if trained_on and trained_on != data.dataset_hash:
        raise DataError(
            f"data: the config's data (hash {data.dataset_hash}) is not the data {source.uri} was "
            "trained on "
            f"(hash {trained_on}); use the data section of its training config so that the test "
            "split is unseen"
        )
    spec = load_spec(source.directory)
    if list(spec.labels) != list(data.labels) or list(spec.input_shape) != list(data.input_shape):
        raise DataError(
            f"data: {source.uri} takes input {spec.input_shape} with {len(spec.labels)} classes, "
            f"the config's data gives {data.input_shape} with {len(data.labels)}"
        )


def reference_stand_in(directory: Path) -> StandIn:
    from kiln.models.artifact import load_spec, load_torch_model

    spec = load_spec(directory)
    return (
        StandIn("safetensors", load_torch_model(directory)[0])
        if spec.format == "safetensors"
        else StandIn(spec.format, None)
    )


def onnx_baseline(reference_dir: Path, out: Path) -> Path:
    """The fp32 reference exported to ONNX: what int8 ONNX variants are compared with (same
    runtime)."""
    from kiln.models.artifact import load_torch_model
    from kiln.models.builders import count_parameters
    from kiln.models.onnx_artifact import export_onnx_model, save_onnx_artifact

    model, spec = load_torch_model(reference_dir)
    spec.variant = {
        "name": BASELINE_ONNX,
        "kind": "baseline",
        "param_count": count_parameters(model),
    }
    return save_onnx_artifact(export_onnx_model(model, spec.input_shape), spec, out)


def register_variant(
    tracking_uri: str,
    source: SourceModel,
    made: Made,
    report: VariantReport,
    parent_version: str,
    data: PreparedData,
    compress_run: str,
) -> str:
    """Log the variant's artifact and metrics on its run, register it as a new version; returns the
    version."""
    from kiln.models.artifact import load_spec
    from kiln.monitor.reference import write_reference
    from kiln.version import __version__ as kiln_version

    spec = load_spec(made.directory)
    tags = {
        "kiln.variant": made.kind,
        "kiln.variant_name": made.name,
        "kiln.parent_version": parent_version,
        "kiln.parent_model_uri": f"models:/{source.name}/{parent_version}",
        "kiln.params": json.dumps(made.params, sort_keys=True),
        **{
            f"kiln.param.{k}": json.dumps(v) if isinstance(v, (dict, list)) else v
            for k, v in trk.flatten(made.params).items()
        },
        "kiln.architecture": spec.architecture,
        "kiln.format": spec.format,
        trk.TAG_DATASET_HASH: data.dataset_hash,
        trk.TAG_KILN_VERSION: kiln_version,
        "kiln.compress_run": compress_run,
        "test_accuracy": f"{report.metrics.test_accuracy:.4f}",
        "size_bytes": report.metrics.size_bytes,
    }
    return register_artifact(
        tracking_uri,
        source.name,
        made.run_id,
        made.directory,
        tags=tags,
        # its own outputs and OOD threshold: a variant is another model
        write_reference=lambda directory: write_reference(directory, data),
        metrics={
            **report.metrics.to_dict(),
            "step_seconds": made.seconds,
            **report.ratios,
            **made.extra,
        },
        description=f"{made.kind} variant '{made.name}' of version {parent_version}",
        finish_run=True,
        data_config=data.config or None,
    ).version


def run_compression(
    cfg: CompressJobConfig,
    address: str | None = None,
    say: Callable[[str], None] = lambda t: None,
    debug: bool = False,
) -> CompressResult:
    """Compress ``cfg.compress.model`` with ``cfg.compress.steps``; evaluate, report, register and
    select.

    Raises ConfigError / ModelError / DataError (nothing run or registered) for user mistakes, and
    KilnError when a step fails (the run is marked FAILED, nothing registered).
    """
    from kiln.version import __version__ as kiln_version

    cc: CompressConfig | None = cfg.compress
    if cc is None or not cc.model:
        raise ConfigError(
            "config key 'compress.model' is required: models:/NAME/VERSION, models:/NAME@ALIAS or "
            "a run id"
        )
    if not cc.steps:
        raise ConfigError("config key 'compress.steps': no steps given")
    tracking_uri = trk.resolve_tracking_uri(cfg.experiment.tracking_uri, cfg.experiment.run_dir)
    source = resolve_source(tracking_uri, cc.model)
    cfg = with_model_data(cfg, source)
    from kiln.ray_connection import ensure_ray

    check_source(cfg.data)
    ensure_ray(address, debug=debug)  # the data is read in Ray Data tasks
    data = prepare_data(cfg.data)
    check_data(source, data)
    from kiln.models.artifact import load_spec

    ref_spec = load_spec(source.directory)
    check_steps(cc, reference_stand_in(source.directory), ref_spec, data)

    exp_id = trk.ensure_experiment(tracking_uri, cfg.experiment.name, cfg.experiment.run_dir)
    run_id = trk.start_run(
        tracking_uri,
        exp_id,
        f"compress-{source.name}-v{source.version}",
        {
            trk.TAG_JOB: "compress",
            trk.TAG_DATASET_HASH: data.dataset_hash,
            trk.TAG_CODE_VERSION: trk.code_version(),
            trk.TAG_KILN_VERSION: kiln_version,
            "kiln.source_model": f"models:/{source.name}/{source.version}",
            "kiln.config_json": json.dumps(cfg.to_dict(), sort_keys=True),
        },
    )
    work_dir = Path(cfg.experiment.run_dir).expanduser().resolve() / "compress" / run_id
    ctx = None
    try:
        trk.log_params(tracking_uri, run_id, trk.flatten(cfg.to_dict()))
        ctx = StepContext(
            cfg, data, work_dir / "variants", tracking_uri, exp_id, run_id, debug, say
        )
        dirs: dict[str, Path] = {REFERENCE: source.directory}
        made: list[Made] = []
        for i, step in enumerate(cc.steps):
            say(f"step {i + 1}/{len(cc.steps)}: {step.kind} '{step.name}' from '{step.input}'")
            for m in run_step(step, i, dirs[step.input], ctx):
                dirs[m.name] = m.directory
                made.append(m)
        result = finish(cfg, cc, source, data, made, dirs, work_dir, tracking_uri, run_id, say)
        trk.end_run(tracking_uri, run_id, "FINISHED")
        return result
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        for rid in [*(ctx.child_runs if ctx else []), run_id]:
            try:
                trk.end_run(tracking_uri, rid, status)
            except Exception:
                pass
        shutil.rmtree(work_dir, ignore_errors=True)
        if isinstance(exc, (KilnError, KeyboardInterrupt)):
            raise
        raise KilnError(
            f"compression failed: {type(exc).__name__}: {first_line(exc) if str(exc) else ''}"
        ) from exc


def finish(
    cfg: CompressJobConfig,
    cc: CompressConfig,
    source: SourceModel,
    data: PreparedData,
    made: list[Made],
    dirs: dict[str, Path],
    work_dir: Path,
    tracking_uri: str,
    run_id: str,
    say,
) -> CompressResult:
    """Evaluate everything side by side, write and log the report, register the variants, apply the
    selection."""
    from kiln.models.artifact import load_spec

    ref_format = load_spec(source.directory).format
    artifacts = {REFERENCE: source.directory}
    if ref_format != "onnx" and any(load_spec(m.directory).format == "onnx" for m in made):
        artifacts[BASELINE_ONNX] = onnx_baseline(
            source.directory, work_dir / "baselines" / BASELINE_ONNX
        )
    artifacts.update({m.name: m.directory for m in made})
    b = cc.benchmark
    say(
        f"evaluating {len(artifacts)} models on {data.sizes()['test']} test rows "
        f"({b.rounds} timing rounds, side by side)"
    )
    metrics = evaluate_artifacts(artifacts, data, b)
    formats = {n: load_spec(p).format for n, p in artifacts.items()}

    def same_runtime(fmt: str) -> str:
        return BASELINE_ONNX if fmt == "onnx" and BASELINE_ONNX in artifacts else REFERENCE

    reference = VariantReport(
        REFERENCE,
        "reference",
        None,
        ref_format,
        metrics[REFERENCE],
        model_uri=f"models:/{source.name}/{source.version}",
        version=source.version,
    )
    baselines = []
    if BASELINE_ONNX in artifacts:
        baselines.append(
            VariantReport(
                BASELINE_ONNX,
                "baseline",
                REFERENCE,
                "onnx",
                metrics[BASELINE_ONNX],
                compared_to=REFERENCE,
                ratios=compare(metrics[BASELINE_ONNX], metrics[REFERENCE]),
                notes=[
                    "the fp32 reference exported to ONNX (not registered): the same-runtime "
                    "baseline of the ONNX variants"
                ],
            )
        )
    variants = []
    for m in made:
        base = same_runtime(formats[m.name])
        variants.append(
            VariantReport(
                m.name,
                m.kind,
                m.input,
                formats[m.name],
                metrics[m.name],
                step_seconds=m.seconds,
                compared_to=base,
                ratios=compare(metrics[m.name], metrics[base]),
                params=m.params,
                extra=m.extra,
                notes=m.notes,
            )
        )

    selection = select_variant(
        metrics[REFERENCE], {v.name: v.metrics for v in variants}, cc.selection
    )
    # Register in step order so that each variant's parent version is known.
    versions = {REFERENCE: source.version}
    for m, report in zip(made, variants, strict=True):
        version = register_variant(tracking_uri, source, m, report, versions[m.input], data, run_id)
        versions[m.name] = report.version = version
        report.model_uri = f"models:/{source.name}/{version}"
    selected_uri = None
    if selection.name:
        trk.set_alias(tracking_uri, source.name, cc.selection.alias, versions[selection.name])
        selected_uri = f"models:/{source.name}/{versions[selection.name]}"
    message = selection.message + (
        f"; alias '{cc.selection.alias}' -> {selected_uri}" if selected_uri else ""
    )

    rows = [reference, *baselines, *variants]
    summary = {
        "source_model": f"models:/{source.name}/{source.version}",
        "compress_run": run_id,
        "dataset_hash": data.dataset_hash,
        "test_rows": data.sizes()["test"],
        "machine": machine_info(),
        "rounds": b.rounds,
        "throughput_batch": b.throughput_batch,
        "selection": {
            "rule": cc.selection.model_dump(),
            "selected": selected_uri,
            "selected_name": selection.name,
            "message": message,
        },
    }
    paths = write_report(work_dir, summary, rows)
    trk.log_metrics(
        tracking_uri, run_id, {f"reference_{k}": v for k, v in metrics[REFERENCE].to_dict().items()}
    )
    for p in paths.values():
        trk.log_artifact(tracking_uri, run_id, p, "report")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(cfg.to_yaml())
        trk.log_artifact(tracking_uri, run_id, Path(tmp) / "config.yaml")
    trk.set_tags(
        tracking_uri,
        run_id,
        {
            "kiln.selected": selected_uri or "none",
            "kiln.variant_versions": json.dumps({m.name: versions[m.name] for m in made}),
        },
    )
    shutil.rmtree(work_dir / "variants", ignore_errors=True)  # the artifacts now live in MLflow
    shutil.rmtree(work_dir / "baselines", ignore_errors=True)
    return CompressResult(
        run_id=run_id,
        tracking_uri=tracking_uri,
        model_name=source.name,
        source=source.uri,
        reference=reference,
        baselines=baselines,
        variants=variants,
        selected=selected_uri,
        selected_name=selection.name,
        selection_message=message,
        report={k: str(v) for k, v in paths.items()},
        table=format_table(rows),
    )
