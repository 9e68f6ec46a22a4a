"""The sweep driver: config -> Ray Tune (OptunaSearch + ASHA) around the training loop -> results.

Steps: check the space and that a trial can be placed; open (or resume) the sweep's folder and
its MLflow parent run; run or restore the Tuner; summarize every trial; then publish (see
``kiln.tune.publish``): best.yaml, plots, registry, tags.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln import tracking as trk
from kiln.config import validate_config
from kiln.errors import ConfigError, KilnError
from kiln.tune.config import TuneJobConfig
from kiln.tune.folder import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    RUNNING,
    SweepFolder,
    check_same_config,
    create_sweep_folder,
    latest_sweep_folder,
    mark_driver,
    stored_num_samples,
)
from kiln.tune.results import INTERRUPTED as TRIAL_INTERRUPTED
from kiln.tune.results import SweepResult
from kiln.tune.space import Dimension, check_space
from kiln.tune.trial_config import trial_epochs, trial_train_config

ProgressFn = Callable[[str], None]
DRIVER_CPUS = 0.01  # a trial that only drives a Ray Train run; its workers reserve their own CPUs


class SweepInterrupted(KeyboardInterrupt):
    """The sweep stopped before every trial ended (Ctrl+C); ``kiln tune CONFIG --resume`` continues
    it."""


def check_sweep(cfg: TuneJobConfig) -> list[Dimension]:
    """Everything about the sweep that can be checked without data or Ray. Returns the
    dimensions."""
    t = cfg.require_tune()
    dims = check_space(cfg)
    epochs = trial_epochs(cfg)
    if t.asha is not None and t.asha.grace_period > epochs:
        raise ConfigError(
            f"config key 'tune.asha.grace_period': {t.asha.grace_period} is more than the "
            f"{epochs} epochs a trial trains (tune.max_epochs or train.epochs)"
        )
    validate_config(trial_train_config(cfg, absolute_paths=False), type(cfg))
    return dims


def trial_resources(cfg: TuneJobConfig) -> tuple[Any, dict[str, float]]:
    """(resources of one trial as Tune reserves them, resources of one trial worker)."""
    t = cfg.require_tune()
    per_worker = {
        "CPU": t.cpus_per_worker,
        **({"GPU": t.gpus_per_worker} if t.gpus_per_worker else {}),
    }
    if on_ray_train(cfg):
        return {"CPU": DRIVER_CPUS}, per_worker
    if t.trial_workers == 1:
        return per_worker, per_worker
    from ray import tune

    # One bundle per rank; bundle 0 is the trial's own process (rank 0), see kiln.tune.ranks.
    return tune.PlacementGroupFactory([per_worker] * t.trial_workers, strategy="PACK"), per_worker


def on_ray_train(cfg: TuneJobConfig) -> bool:
    """GPU trials run a Ray Train job each; CPU trials train in their own process, as rank 0 of
    their peers when ``trial_workers`` > 1 (``kiln.tune.ranks``)."""
    return bool(cfg.require_tune().gpus_per_worker)


def _build_tuner(
    cfg: TuneJobConfig,
    dims: list[Dimension],
    trainable,
    folder: SweepFolder,
    max_concurrent: int | None,
    runs_callback,
    warm=None,
):
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    from kiln.tune.budget import EpochBudget
    from kiln.tune.progress import SweepProgress
    from kiln.tune.scheduler import make_scheduler
    from kiln.tune.search import make_searcher
    from kiln.tune.trial import trial_dirname, trial_name

    t = cfg.require_tune()
    searcher = make_searcher(t, dims, max_concurrent, warm)
    metrics: list[str] = [o.metric for o in t.objectives]
    epochs = trial_epochs(cfg)
    progress = SweepProgress(
        str(folder.path),
        epochs,
        metrics + [m for m in ("val_accuracy",) if m not in metrics],
        t.num_samples,
        t.budget_epochs,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=make_scheduler(t, epochs, folder.path),
            num_samples=t.num_samples,
            max_concurrent_trials=max_concurrent,
            time_budget_s=t.time_budget_s,
            reuse_actors=True,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=folder.tune_dir.name,
            stop=EpochBudget(t.budget_epochs, str(folder.tune_dir)) if t.budget_epochs else None,
            storage_path=str(folder.path),
            verbose=0,
            # result.json per trial: each trial's epochs for the summary and plots
            callbacks=[runs_callback, progress, JsonLoggerCallback()],
            log_to_file=True,
            # Every checkpoint is kept until the sweep ends (see prune_superseded_checkpoints).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            # a trial whose process died resumes from its last checkpoint (Ray Tune restarts any
            # failed trial: a deterministic error costs one more attempt before it is reported)
            failure_config=tune.FailureConfig(max_failures=t.trial_max_failures),
        ),
    )


def _default_concurrency(cfg: TuneJobConfig, per_worker: dict[str, float]) -> int | None:
    """Trials running Ray Train jobs reserve almost nothing in Tune: cap them by what their workers
    need."""
    from kiln.ray_connection import placeable_slots

    t = cfg.require_tune()
    if t.max_concurrent_trials:
        return t.max_concurrent_trials
    if not on_ray_train(cfg):
        return None  # Tune itself runs as many as the trial resources allow
    return max(1, placeable_slots(per_worker) // t.trial_workers)


def run_sweep(
    cfg: TuneJobConfig,
    address: str | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
    debug: bool = False,
    warm_start: str | None = None,
) -> SweepResult:
    """Run (or, with ``resume``, continue) the sweep of ``cfg.tune``. Returns the SweepResult.

    ``warm_start``: a finished sweep's folder or MLflow run id whose trials seed the searcher (a
    new sweep only). Raises ConfigError for a bad space, ResourceError when a trial can never be
    placed, KilnError when there is nothing to resume or no usable warm start,
    SweepInterrupted when stopped before the end.
    """
    import optuna

    from kiln.data.dataset import check_source, prepare_data
    from kiln.ray_connection import check_placement, ensure_ray
    from kiln.train.run import check_model_fits_data
    from kiln.tune.budget import budget_spent
    from kiln.tune.progress import progress_sink
    from kiln.tune.publish import publish
    from kiln.tune.results import summarize
    from kiln.tune.runs import child_runs
    from kiln.tune.scheduler import EARLY_STOPS_FILE, read_early_stops
    from kiln.tune.trial import TIME_ATTR

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    say = progress or (lambda text: None)
    # 1. Check everything that can fail fast: config, resume target, data, model, placement.
    dims = check_sweep(cfg)
    t = cfg.require_tune()
    if resume and warm_start:
        raise ConfigError(
            "--warm-start seeds a new sweep; a resumed sweep continues with its own searcher "
            "(drop one of --resume and --warm-start)"
        )
    folder = latest_sweep_folder(cfg) if resume else None
    grow_from = None
    if folder is not None:
        check_same_config(folder, cfg.to_dict())
        if t.num_samples > stored_num_samples(folder.state):
            grow_from = stored_num_samples(folder.state)
    base = validate_config(trial_train_config(cfg, absolute_paths=True), type(cfg))
    warm = None
    if warm_start:
        from kiln.tune.warm_start import load_warm_start

        warm = load_warm_start(
            warm_start,
            dims,
            t.objectives,
            trial_train_config(cfg, absolute_paths=False),
            trk.resolve_tracking_uri(base.experiment.tracking_uri, base.experiment.run_dir),
        )
        say(warm.summary())
    # Ray before the data: prepare_data reads it in Ray Data tasks and would otherwise start a
    # local instance of its own, and the sweep would run there instead of on --address.
    check_source(base.data)
    ensure_ray(address, debug=debug)
    data = prepare_data(base.data)
    check_model_fits_data(base, data)
    trial_res, per_worker = trial_resources(cfg)
    check_placement(t.trial_workers, per_worker, what="tune.trial_workers")

    # 2. The sweep's folder and MLflow parent run (new, or those of the sweep being resumed).
    tracking_uri = trk.resolve_tracking_uri(base.experiment.tracking_uri, base.experiment.run_dir)
    experiment_id = trk.ensure_experiment(
        tracking_uri, cfg.experiment.name, base.experiment.run_dir
    )
    folder, parent = _open_sweep(cfg, folder, tracking_uri, experiment_id, data.dataset_hash)
    if warm is not None:
        _record_warm_start(folder, tracking_uri, parent, warm)
    if grow_from is not None:
        say(
            f"growing sweep {folder.path} from {grow_from} to {t.num_samples} trials: only the "
            f"{t.num_samples - grow_from} new trial(s) run"
        )
        _record_growth(folder, cfg, tracking_uri, parent, grow_from)

    # 3. Run the trials with Ray Tune (or continue them).
    tuner, kept = _tuner(
        cfg,
        dims,
        folder,
        base,
        data,
        trial_res,
        _default_concurrency(cfg, per_worker),
        (tracking_uri, experiment_id, parent),
        resume,
        warm,
        grow=grow_from is not None,
    )
    if kept is not None:
        say(f"resuming {folder.path}: {kept} trial(s) had ended and are kept, the rest continue")
    if resume:
        known = set(_trial_statuses(folder)) if kept is not None else set()
        drop_forgotten_trial_runs(tracking_uri, experiment_id, parent, known)
    started = time.monotonic()
    with warnings.catch_warnings(), progress_sink(str(folder.path), say):
        warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning, Ray's deprecation notes
        grid = tuner.fit()
    prune_superseded_checkpoints(grid)
    budget_hit = (
        t.time_budget_s is not None and time.monotonic() - started >= 0.95 * t.time_budget_s
    ) or budget_spent([int((r.metrics or {}).get(TIME_ATTR) or 0) for r in grid], t.budget_epochs)

    # 4. Summarize every trial; publish unless the sweep was interrupted.
    unfinished = {
        tid
        for tid, status in _trial_statuses(folder).items()
        if status not in ("TERMINATED", "ERROR")
    }
    trials = summarize(
        grid,
        dims,
        trial_epochs(cfg),
        read_early_stops(folder.path / EARLY_STOPS_FILE),
        budget_hit,
        child_runs(tracking_uri, experiment_id, parent),
        unfinished,
    )
    if any(tr.status == TRIAL_INTERRUPTED for tr in trials) or (
        not budget_hit and len(trials) < t.num_samples
    ):
        folder.save(status=INTERRUPTED, driver_pid=None)
        raise SweepInterrupted(
            f"sweep {folder.path} interrupted; continue it with: kiln tune CONFIG --resume"
        )
    try:
        result = publish(cfg, dims, folder, trials, data, tracking_uri, parent, progress=say)
    except KilnError:
        folder.save(status=FAILED, driver_pid=None)
        raise
    result.resumed, result.kept_from_before = bool(resume), kept or 0
    folder.save(status=FINISHED, driver_pid=None, finished=time.time())
    return result


def _open_sweep(
    cfg: TuneJobConfig,
    folder: SweepFolder | None,
    tracking_uri: str,
    experiment_id: str,
    dataset_hash: str,
) -> tuple[SweepFolder, str]:
    """(folder, parent run id): a new folder and parent run, or the resumed sweep's."""
    from kiln.tune.runs import start_parent_run

    if folder is not None:
        mark_driver(folder, status=RUNNING)
        return folder, folder.state["parent_run_id"]
    folder = create_sweep_folder(cfg)
    parent = start_parent_run(cfg, tracking_uri, experiment_id, dataset_hash, folder.path)
    mark_driver(
        folder,
        name=folder.name,
        config=cfg.to_dict(),
        parent_run_id=parent,
        experiment_id=experiment_id,
        status=RUNNING,
        created=time.time(),
    )
    return folder, parent


def _record_warm_start(folder: SweepFolder, tracking_uri: str, parent: str, warm) -> None:
    """The warm start in the sweep's lineage: sweep.json (and so results.json) and the parent
    run's tags."""
    folder.save(warm_start=warm.lineage())
    trk.set_tags(
        tracking_uri,
        parent,
        {
            "kiln.tune.warm_start": warm.run_id or warm.sweep_dir or warm.source,
            "kiln.tune.warm_start_dir": warm.sweep_dir or "",
            "kiln.tune.warm_start_trials": len(warm.trials),
            "kiln.tune.warm_start_skipped": len(warm.skipped),
        },
    )


def _record_growth(
    folder: SweepFolder, cfg: TuneJobConfig, tracking_uri: str, parent: str, grow_from: int
) -> None:
    """A sweep grown by --resume: its new size in sweep.json (the config a later --resume compares
    against) with the growth in its lineage, and on the parent run's tags (MLflow params cannot
    change, so ``tune.num_samples`` there stays the size the sweep started with)."""
    size = cfg.require_tune().num_samples
    grown = [*folder.state.get("grown", []), {"from": grow_from, "to": size, "at": time.time()}]
    folder.save(config=cfg.to_dict(), grown=grown)
    trk.set_tags(
        tracking_uri,
        parent,
        {
            "kiln.tune.num_samples": size,
            "kiln.tune.grown": ", ".join(f"{g['from']}->{g['to']}" for g in grown),
        },
    )


def _tuner(
    cfg: TuneJobConfig,
    dims: list[Dimension],
    folder: SweepFolder,
    base: TuneJobConfig,
    data,
    trial_res: Any,
    max_concurrent: int | None,
    tracking: tuple[str, str, str],
    resume: bool,
    warm=None,
    grow: bool = False,
):
    """(Tuner, trials kept from before or None): restored when resuming a folder that holds Tune's
    state (a driver may die before Tune saved any), else new."""
    from ray import tune

    from kiln.data.dataset import open_splits
    from kiln.tune.runs import SweepRuns
    from kiln.tune.trial import TrialContext, run_trial

    ctx = TrialContext(
        base_config=base.to_dict(),
        schema=type(base),
        dims=dims,
        sweep_name=folder.name,
        measures=tuple(o.metric for o in cfg.require_tune().objectives if o.metric == "latency_ms"),
        data_config=base.data.model_dump(mode="json"),
    )
    # The splits are opened (cached in the object store when small) once, here: trials share them
    # and read their rows through Ray Data, instead of each decoding the data again.
    datasets = open_splits(data, ("train", "val"), base.train.data.cache)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, ctx=ctx, data=data, datasets=datasets), trial_res
    )
    # How often Tune saves its state is TUNE_GLOBAL_CHECKPOINT_S, read from this process's
    # environment when the Tuner starts (no Tuner option): the CLI entry sets 2 s, so a killed
    # driver re-runs little; Tune's own default ("auto", at least 10 s) is as correct, only slower
    # to resume.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not (resume and tune.Tuner.can_restore(str(folder.tune_dir))):
            runs = SweepRuns(*tracking, base.to_dict(), type(base), dims, data.dataset_hash)
            return _build_tuner(cfg, dims, trainable, folder, max_concurrent, runs, warm), None
        kept = sum(st in ("TERMINATED", "ERROR") for st in _trial_statuses(folder).values())
        if grow:
            from kiln.compat import grow_saved_sweep

            # The restored search algorithm creates trials up to the count it saved.
            grow_saved_sweep(str(folder.tune_dir), cfg.require_tune().num_samples)
        return tune.Tuner.restore(
            str(folder.tune_dir), trainable=trainable, resume_unfinished=True, resume_errored=False
        ), kept


def _trial_statuses(folder: SweepFolder) -> dict[str, str]:
    """``{trial_id: status}`` from Ray Tune's saved state (TERMINATED and ERROR trials are not run
    again)."""
    from ray.tune import ExperimentAnalysis

    # Called only where the state exists (after fit, or after Tuner.can_restore): any error here
    # is a real one, not "no trials".
    analysis = ExperimentAnalysis(str(folder.tune_dir.resolve()))
    return {tr.trial_id: tr.status for tr in analysis.trials}


def drop_forgotten_trial_runs(
    tracking_uri: str, experiment_id: str, parent: str, known: set[str]
) -> list[str]:
    """Delete (MLflow's soft delete) the child runs of trials that Tune's saved state does not
    know. Returns their run ids.

    A driver killed after it started a trial (and its child run) but before Tune saved a state
    naming that trial leaves a run Tune has forgotten: on --resume, Tune asks the searcher for a
    new trial, with a new trial id and the same trial number, so the sweep would show two child
    runs for one number, one of them empty and never closed.
    """
    from kiln.tune.runs import child_runs

    forgotten = [
        run_id
        for trial_id, run_id in child_runs(tracking_uri, experiment_id, parent).items()
        if trial_id not in known
    ]
    client = trk.client(tracking_uri)
    for run_id in forgotten:
        client.delete_run(run_id)
    return forgotten


def prune_superseded_checkpoints(grid: Any) -> None:
    """Delete every checkpoint of each trial but the last one (the one the sweep publishes).

    Ray Tune keeps every checkpoint while the sweep runs (``num_to_keep=None`` in the Tuner): with
    ``num_to_keep`` set, it deletes a trial's previous checkpoint the moment a newer one is
    registered, but saves the experiment state that names checkpoints later, asynchronously. A
    driver killed in between left state naming a deleted checkpoint, and on ``--resume`` that
    trial's restore failed ("does not exist on storage anymore"). Here, after ``Tuner.fit``
    returned, Tune has saved its final state synchronously, so only the checkpoint it names is
    ever needed again.
    """
    import shutil

    for result in grid:
        if result.checkpoint is None or result.checkpoint.filesystem.type_name != "local":
            continue
        keep = Path(result.checkpoint.path)
        for old in keep.parent.glob("checkpoint_*"):
            if old != keep and old.is_dir():
                shutil.rmtree(old)
