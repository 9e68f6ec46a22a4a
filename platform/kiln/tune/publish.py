"""After the trials: pick the best trial (or the Pareto front), write best.yaml and plots, register
the model(s), tag and close the MLflow child runs, and close the sweep's parent run.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln import tracking as trk
from kiln.errors import KilnError
from kiln.models.registration import copy_artifact, register_artifact
from kiln.tune.config import TuneJobConfig
from kiln.tune.results import (
    COMPLETED,
    FAILED,
    STOPPED_EARLY,
    SweepResult,
    TrialSummary,
    count,
    pareto_front,
    pick_best,
)
from kiln.tune.space import Dimension, apply_params
from kiln.tune.trial_config import trial_train_config

if TYPE_CHECKING:
    from kiln.data.dataset import PreparedData

TAG_STATUS = "kiln.tune.status"
TAG_BEST = "kiln.tune.best"
TAG_PARETO = "kiln.tune.pareto"
# What sweep.json records of where a sweep's trials came from (warm start, growth by --resume).
LINEAGE_KEYS = ("warm_start", "grown")


def _data_for(cfg_dict: dict[str, Any], schema: type[TuneJobConfig], data):
    """The prepared data of a trial's config (the sweep's data unless the space changed data.*)."""
    from kiln.config import validate_config
    from kiln.data.dataset import prepare_data

    trial_cfg = validate_config(cfg_dict, schema)
    return (
        data
        if trial_cfg.data.model_dump(mode="json") == cfg_dict["data"] and data is not None
        else prepare_data(trial_cfg.data)
    )


def register_trial_model(
    cfg: TuneJobConfig,
    tracking_uri: str,
    trial: TrialSummary,
    data: PreparedData,
    tags: dict[str, Any],
) -> tuple[str, dict[str, float]]:
    """Log the trial's final model to its child run, evaluate it on the test split and register it.

    Returns (models:/NAME/VERSION, test metrics). Raises FileNotFoundError when the trial left no
    checkpoint.
    """
    from kiln.monitor.reference import write_reference
    from kiln.train.run import evaluate_test, log_profile

    if not trial.checkpoint or not Path(trial.checkpoint).is_dir():
        raise FileNotFoundError(f"trial {trial.number} left no checkpoint at {trial.checkpoint}")
    if trial.run_id is None:
        raise KilnError(f"trial {trial.number} has no MLflow run to register its model from")
    with tempfile.TemporaryDirectory(prefix="kiln-tune-model-") as tmp:
        model_dir = copy_artifact(trial.checkpoint, Path(tmp) / trk.MODEL_ARTIFACT_PATH)
        test_metrics, _ = evaluate_test(model_dir, data)
        log_profile(tracking_uri, trial.run_id, data, Path(tmp))  # the card's split sizes
        registration = register_artifact(
            tracking_uri,
            cfg.experiment.name,
            trial.run_id,
            model_dir,
            tags={**tags, "kiln.architecture": cfg.model.name},
            data_config=cfg.data.portable(),
            test_metrics=test_metrics,
            # what serving monitors this version against
            write_reference=lambda directory: write_reference(directory, data),
        )
    return registration.uri, registration.test_metrics


def _backfill_epochs(tracking_uri: str, run_id: str, trial: TrialSummary) -> None:
    """Log on ``run_id`` the epochs Tune recorded that the run lacks (results that reached Tune's
    state but not the callback)."""
    from kiln.tune.runs import log_epoch

    logged = {int(m.step) for m in trk.metric_history(tracking_uri, run_id, "epoch")}
    for row in trial.history:
        epoch = int(row["epochs_done"]) - 1
        if epoch not in logged:
            log_epoch(tracking_uri, run_id, epoch, row)


def _close_child_runs(
    tracking_uri: str,
    trials: list[TrialSummary],
    best: TrialSummary | None,
    front: list[TrialSummary],
    multi: bool,
) -> None:
    front_numbers = {t.number for t in front}
    for t in trials:
        if not t.run_id:
            continue
        _backfill_epochs(tracking_uri, t.run_id, t)
        tags = {TAG_STATUS: t.status, "kiln.tune.epochs": t.epochs}
        if t.status == STOPPED_EARLY:
            tags["kiln.tune.stopped_at_epoch"] = t.epochs
        if t.error:
            tags["kiln.tune.error"] = t.error
        if best is not None:
            tags[TAG_BEST] = str(t.number == best.number).lower()
        if multi:
            tags[TAG_PARETO] = str(t.number in front_numbers).lower()
        trk.set_tags(tracking_uri, t.run_id, tags)
        trk.end_run(tracking_uri, t.run_id, "FAILED" if t.status == FAILED else "FINISHED")


def publish(
    cfg,
    dims: list[Dimension],
    folder,
    trials: list[TrialSummary],
    data,
    tracking_uri: str,
    parent: str,
    progress: Callable[[str], None],
):
    """Write the sweep's outputs and close its runs. Returns the SweepResult.

    Raises KilnError when every trial failed (the runs are closed as FAILED).
    """
    from kiln.tune.outputs import write_plots

    objectives, multi = cfg.require_tune().objectives, cfg.require_tune().multi_objective
    try:
        failed = [t for t in trials if t.status == FAILED]
        if trials and len(failed) == len(trials):
            _close_child_runs(tracking_uri, trials, None, [], multi)
            first = failed[0]
            raise KilnError(
                f"all {len(trials)} trials failed; trial {first.number}: {first.error} "
                f"(its log: {folder.tune_dir}/trial_{first.number:04d}_{first.trial_id})"
            )
        best = pick_best(trials, objectives)
        front = pareto_front(trials, objectives) if multi else []
        _close_child_runs(tracking_uri, trials, best, front, multi)
        best_path, best_config = _write_train_configs(cfg, folder, parent, best, front)
        progress("registering the best model" + (" and the Pareto front's models" if multi else ""))
        known = folder.state.get("registered") or {}
        model_uris, test_metrics, registered = _register_models(
            cfg, tracking_uri, data, parent, front if multi else [best] if best else [], best, known
        )
        folder.save(registered={**known, **registered})
        plots, notes = write_plots(trials, dims, objectives, folder.path / "plots")
        lineage = {k: folder.state[k] for k in LINEAGE_KEYS if k in folder.state}
        results_path = folder.path / "results.json"
        results_path.write_text(
            json.dumps(
                {
                    "objectives": [o.model_dump() for o in objectives],
                    "trials": [t.to_dict() for t in trials],
                    "best_trial": best.number if best else None,
                    "front": [m.number for m in front] if multi else None,
                    "lineage": lineage,
                },
                indent=1,
                default=str,
            )
        )
        _close_parent_run(
            tracking_uri,
            parent,
            trials,
            objectives,
            best,
            front,
            model_uris.get(best.number) if best else None,
            files=[p for p in (best_path, results_path) if p],
            plots=plots,
            front_dir=folder.path / "front" if multi else None,
        )
    except Exception:
        trk.end_run(tracking_uri, parent, "FAILED")
        raise
    return SweepResult(
        run_id=parent,
        sweep_dir=str(folder.path),
        tracking_uri=tracking_uri,
        objectives=[o.model_dump() for o in objectives],
        trials=trials,
        best=best,
        front=front,
        best_config_path=str(best_path) if best_path else None,
        best_config=best_config,
        model_uri=model_uris.get(best.number) if best else None,
        front_model_uris=model_uris if multi else {},
        test_metrics=test_metrics,
        plots=[str(p) for p in plots],
        notes=notes,
        lineage=lineage,
    )


def _write_train_configs(
    cfg, folder, parent: str, best: TrialSummary | None, front: list[TrialSummary]
) -> tuple[Path | None, dict[str, Any] | None]:
    """best.yaml (and front/trial_N.yaml for each Pareto-front member). Returns (path, config) of
    best.yaml."""
    from kiln.tune.outputs import write_train_config

    if best is None:
        return None, None
    base = trial_train_config(
        cfg, absolute_paths=False
    )  # the user's paths, as the config gave them
    values = ", ".join(
        f"{o.metric} {best.metrics.get(o.metric):.6g}" for o in cfg.require_tune().objectives
    )
    path = write_train_config(
        base,
        best,
        folder.path / "best.yaml",
        f"Best trial ({best.number}) of sweep {folder.name} (MLflow run {parent}): {values}.\n"
        f"Reproduce it: kiln train best.yaml",
    )
    objective_txt = ", ".join(f"{o.metric} ({o.mode})" for o in cfg.require_tune().objectives)
    for member in front:
        name = f"trial_{member.number:04d}.yaml"
        write_train_config(
            base,
            member,
            folder.path / "front" / name,
            f"Pareto-front member (trial {member.number}) of sweep {folder.name}: "
            f"{objective_txt}.\n"
            f"Reproduce it: kiln train front/{name}",
        )
    return path, apply_params(base, best.params)


def _register_models(
    cfg,
    tracking_uri: str,
    data,
    parent: str,
    members: list[TrialSummary],
    best: TrialSummary | None,
    known: dict[str, dict[str, Any]],
) -> tuple[dict[int, str], dict[str, float], dict[str, dict[str, Any]]]:
    """Register each member's model. Returns ({trial number: model URI}, the best trial's test
    metrics, {str(trial number): {"uri", "test_metrics"}} of the members).

    ``known``: members registered by an earlier publish of this sweep (before it grew): their
    version is reused, not registered twice.
    """

    uris: dict[int, str] = {}
    best_test: dict[str, float] = {}
    registered: dict[str, dict[str, Any]] = {}
    for member in members:
        if str(member.number) in known:
            entry = known[str(member.number)]
            uris[member.number] = entry["uri"]
            registered[str(member.number)] = entry
            if best is not None and member.number == best.number:
                best_test = dict(entry["test_metrics"])
            continue
        member_cfg = apply_params(trial_train_config(cfg, absolute_paths=True), member.params)
        tags = {
            "kiln.tune.sweep_run_id": parent,
            "kiln.tune.trial": member.number,
            trk.TAG_DATASET_HASH: data.dataset_hash,
            "kiln.variant": "fp32",
            **{
                f"kiln.tune.{o.metric}": f"{member.metrics.get(o.metric):.6g}"
                for o in cfg.require_tune().objectives
            },
        }
        if cfg.require_tune().multi_objective:
            tags[TAG_PARETO] = "true"
        uri, test_metrics = register_trial_model(
            cfg, tracking_uri, member, _data_for(member_cfg, type(cfg), data), tags
        )
        uris[member.number] = uri
        registered[str(member.number)] = {"uri": uri, "test_metrics": test_metrics}
        if best is not None and member.number == best.number:
            best_test = test_metrics
    return uris, best_test, registered


def _close_parent_run(
    tracking_uri: str,
    parent: str,
    trials: list[TrialSummary],
    objectives,
    best,
    front,
    model_uri: str | None,
    files: list[Path],
    plots: list[Path],
    front_dir: Path | None,
) -> None:
    summary: dict[str, float] = {
        "trials": len(trials),
        "trials_completed": count(trials, COMPLETED),
        "trials_stopped_early": count(trials, STOPPED_EARLY),
        "trials_failed": count(trials, FAILED),
    }
    if best is not None:
        summary.update({f"best_{o.metric}": best.metrics[o.metric] for o in objectives})
    trk.log_metrics(tracking_uri, parent, summary)
    tags = {
        "kiln.tune.best_trial": best.number if best else "none",
        "kiln.model_uri": model_uri or "none",
    }
    if front_dir is not None:
        tags["kiln.tune.front"] = ",".join(str(m.number) for m in front)
    trk.set_tags(tracking_uri, parent, tags)
    for path in files:
        trk.log_artifact(tracking_uri, parent, path)
    for path in plots:
        trk.log_artifact(tracking_uri, parent, path, "plots")
    if front_dir is not None and front_dir.is_dir():
        trk.log_artifacts(tracking_uri, parent, front_dir, "front")
    trk.end_run(tracking_uri, parent, "FINISHED")
