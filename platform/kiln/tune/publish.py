"""After the trials: pick the best trial (or the Pareto front), write best.yaml and plots, register
the model(s), tag and close the MLflow child runs, and close the sweep's parent run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from kiln import tracking as trk
from kiln.tune.results import COMPLETED, FAILED, STOPPED_EARLY, TrialSummary, count, pareto_front, pick_best
from kiln.tune.space import Dimension, apply_params

TAG_STATUS = "kiln.tune.status"
TAG_BEST = "kiln.tune.best"
TAG_PARETO = "kiln.tune.pareto"
MODEL_FILES = ("spec.json", "model.safetensors", "MLmodel")


def _data_for(cfg_dict: dict[str, Any], data):
    """The prepared data of a trial's config (the sweep's data unless the space changed data.*)."""
    from kiln.config import validate_config
    from kiln.data.dataset import prepare_data

    trial_cfg = validate_config(cfg_dict)
    return data if trial_cfg.data.model_dump(mode="json") == cfg_dict["data"] and data is not None \
        else prepare_data(trial_cfg.data)


def register_trial_model(cfg, tracking_uri: str, trial: TrialSummary, data, tags: dict[str, Any]) -> tuple[str, dict]:
    """Log the trial's final model to its child run, evaluate it on the test split and register it.

    Returns (models:/NAME/VERSION, test metrics).
    """
    from kiln.train.run import evaluate_test

    if not trial.checkpoint or not Path(trial.checkpoint).is_dir():
        raise FileNotFoundError(f"trial {trial.number} left no checkpoint at {trial.checkpoint}")
    with tempfile.TemporaryDirectory(prefix="kiln-tune-model-") as tmp:
        model_dir = Path(tmp) / trk.MODEL_ARTIFACT_PATH
        model_dir.mkdir()
        for name in MODEL_FILES:
            shutil.copy2(Path(trial.checkpoint) / name, model_dir / name)
        test_metrics, _ = evaluate_test(model_dir, data)
        trk.log_artifacts(tracking_uri, trial.run_id, model_dir, trk.MODEL_ARTIFACT_PATH)
    trk.log_metrics(tracking_uri, trial.run_id, test_metrics)
    version = trk.register_model(tracking_uri, cfg.experiment.name, trial.run_id, tags={
        **tags, "test_accuracy": f"{test_metrics['test_accuracy']:.4f}", "kiln.architecture": cfg.model.name})
    trk.set_tags(tracking_uri, trial.run_id, {"kiln.model_version": version})
    return f"models:/{cfg.experiment.name}/{version}", test_metrics


def _backfill_epochs(tracking_uri: str, trial: TrialSummary) -> None:
    """Log epochs Tune recorded that the run lacks (results that reached Tune's state but not the callback)."""
    from kiln.tune.runs import log_epoch

    logged = {int(m.step) for m in trk.metric_history(tracking_uri, trial.run_id, "epoch")}
    for row in trial.history:
        epoch = int(row["epochs_done"]) - 1
        if epoch not in logged:
            log_epoch(tracking_uri, trial.run_id, epoch, row)


def _close_child_runs(tracking_uri: str, trials: list[TrialSummary], best: TrialSummary | None,
                      front: list[TrialSummary], multi: bool) -> None:
    front_numbers = {t.number for t in front}
    for t in trials:
        if not t.run_id:
            continue
        _backfill_epochs(tracking_uri, t)
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


def publish(cfg, dims: list[Dimension], folder, trials: list[TrialSummary], data, tracking_uri: str, parent: str,
            progress: Callable[[str], None]):
    """Write the sweep's outputs and close its runs. Returns the SweepResult."""
    from kiln.tune.outputs import write_plots, write_train_config
    from kiln.tune.sweep import SweepResult, trial_train_config

    t = cfg.tune
    objectives = t.objectives
    multi = t.multi_objective
    try:
        best = pick_best(trials, objectives)
        front = pareto_front(trials, objectives) if multi else ([best] if best else [])
        _close_child_runs(tracking_uri, trials, best, front, multi)
        reproduce_base = trial_train_config(cfg, absolute_paths=False)
        objective_txt = ", ".join(f"{o.metric} ({o.mode})" for o in objectives)

        best_path = best_config = model_uri = None
        front_uris: dict[int, str] = {}
        test_metrics: dict[str, float] = {}
        if best is not None:
            values = ", ".join(f"{o.metric} {best.metrics.get(o.metric):.6g}" for o in objectives)
            header = (f"Best trial ({best.number}) of sweep {folder.name} (MLflow run {parent}): {values}.\n"
                      f"Reproduce it: kiln train best.yaml")
            best_path = write_train_config(reproduce_base, best, folder.path / "best.yaml", header)
            best_config = apply_params(reproduce_base, best.params)
            to_register = front if multi else [best]
            for member in to_register:
                member_cfg = apply_params(trial_train_config(cfg, absolute_paths=True), member.params)
                tags = {"kiln.tune.sweep_run_id": parent, "kiln.tune.trial": member.number,
                        trk.TAG_DATASET_HASH: data.dataset_hash, "kiln.variant": "fp32",
                        **{f"kiln.tune.{o.metric}": f"{member.metrics.get(o.metric):.6g}" for o in objectives}}
                if multi:
                    tags[TAG_PARETO] = "true"
                    write_train_config(reproduce_base, member, folder.path / "front" / f"trial_{member.number:04d}.yaml",
                                       f"Pareto-front member (trial {member.number}) of sweep {folder.name}: "
                                       f"{objective_txt}.\nReproduce it: kiln train front/trial_{member.number:04d}.yaml")
                uri, metrics = register_trial_model(cfg, tracking_uri, member, _data_for(member_cfg, data), tags)
                front_uris[member.number] = uri
                if member is best:
                    model_uri, test_metrics = uri, metrics

        plots, notes = write_plots(trials, dims, objectives, folder.path / "plots")
        (folder.path / "results.json").write_text(json.dumps(
            {"objectives": [o.model_dump() for o in objectives], "trials": [tr.to_dict() for tr in trials],
             "best_trial": best.number if best else None, "front": [m.number for m in front] if multi else None},
            indent=1, default=str))

        summary = {"trials": len(trials), "trials_completed": count(trials, COMPLETED),
                   "trials_stopped_early": count(trials, STOPPED_EARLY), "trials_failed": count(trials, FAILED)}
        if best is not None:
            summary.update({f"best_{o.metric}": best.metrics[o.metric] for o in objectives})
        trk.log_metrics(tracking_uri, parent, summary)
        trk.set_tags(tracking_uri, parent, {"kiln.tune.best_trial": best.number if best else "none",
                                            "kiln.model_uri": model_uri or "none",
                                            **({"kiln.tune.front": ",".join(str(m.number) for m in front)}
                                               if multi else {})})
        for path in [best_path, folder.path / "results.json"]:
            if path:
                trk.log_artifact(tracking_uri, parent, path)
        for path in plots:
            trk.log_artifact(tracking_uri, parent, path, "plots")
        if multi and (folder.path / "front").is_dir():
            trk.log_artifacts(tracking_uri, parent, folder.path / "front", "front")
        trk.end_run(tracking_uri, parent, "FINISHED")
    except Exception:
        trk.end_run(tracking_uri, parent, "FAILED")
        raise
    return SweepResult(
        run_id=parent, sweep_dir=str(folder.path), tracking_uri=tracking_uri,
        objectives=[o.model_dump() for o in objectives], trials=trials, best=best, front=front if multi else [],
        best_config_path=str(best_path) if best_path else None, best_config=best_config, model_uri=model_uri,
        front_model_uris=front_uris, test_metrics=test_metrics, plots=[str(p) for p in plots], notes=notes)
