"""The training driver: data -> MLflow run -> Ray Train TorchTrainer -> test evaluation -> registry.

Nothing is registered unless every step succeeded; a failed run is marked FAILED in MLflow.
"""

from __future__ import annotations

import json
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln import tracking as trk
from kiln.data.dataset import PreparedData, check_source, prepare_data
from kiln.errors import ConfigError, KilnError, first_line
from kiln.models.card import PROFILE_ARTIFACT
from kiln.models.registration import copy_artifact, register_artifact
from kiln.monitor.reference import write_reference
from kiln.train.checkpoint import find_latest_checkpoint
from kiln.train.config import TrainingJobConfig, training_sections
from kiln.train.metrics import (
    EPOCH_METRICS,
    accuracy,
    classification_report,
    confusion_matrix,
    f1_macro,
)
from kiln.train.report import confusion_matrix_png, failure_line


@dataclass
class TrainResult:
    """What a finished training run produced (the CLI's ``--json`` line)."""

    run_id: str
    tracking_uri: str
    model_uri: str
    model_name: str
    model_version: str
    dataset_hash: str
    checkpoint: str
    metrics: dict[str, float]
    epochs: list[dict[str, Any]] = field(default_factory=list)
    per_class: list[dict[str, Any]] = field(default_factory=list)
    split_sizes: dict[str, int] = field(default_factory=dict)
    resumed_from_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressFn = Callable[[dict[str, Any]], None]


def check_model_fits_data(cfg: TrainingJobConfig, data: PreparedData) -> None:
    """Build the model and run one batch, so an architecture that cannot take this input fails
    early."""
    import torch

    from kiln.models.artifact import build_model
    from kiln.train.loop import model_spec

    try:
        model = build_model(model_spec(cfg, data), [cfg.model.name]).eval()
        with torch.no_grad():
            out = model(torch.from_numpy(data.x_train[:2]))
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"config key 'model': model '{cfg.model.name}' cannot take this data "
            f"(input {data.input_shape}): {first_line(exc)}"
        ) from None
    if tuple(out.shape) != (min(2, len(data.x_train)), data.num_classes):
        raise ConfigError(
            f"config key 'model': model '{cfg.model.name}' outputs {list(out.shape)}, "
            f"expected [batch, {data.num_classes}]"
        )


def storage_root(cfg: TrainingJobConfig) -> str:
    if cfg.experiment.storage_path:
        return cfg.experiment.storage_path
    return str(Path(cfg.experiment.run_dir).expanduser().resolve() / "checkpoints")


def _resumable_run(tracking_uri: str, resume: str):
    """The run ``--resume`` names; KilnError when there is none or it already finished. Needs no
    data, so ``run_training`` calls it before reading any: a wrong id fails at once."""
    run = trk.get_run(tracking_uri, resume)
    if run.info.status == "FINISHED":
        raise KilnError(f"--resume {resume}: that run already finished; start a new run instead")
    return run


def _start_or_resume_run(
    cfg: TrainingJobConfig, data: PreparedData, tracking_uri: str, resume: str | None
) -> str:
    if resume:
        run = _resumable_run(tracking_uri, resume)
        logged = run.data.tags.get(trk.TAG_DATASET_HASH)
        if logged and logged != data.dataset_hash:
            raise KilnError(
                f"--resume {resume}: the data changed since the run started "
                f"(dataset hash {data.dataset_hash}, run has {logged})"
            )
        stored = json.loads(run.data.tags.get("kiln.config_json", "{}") or "{}")
        if stored and stored != cfg.to_dict():
            flat_old, flat_new = trk.flatten(stored), trk.flatten(cfg.to_dict())
            diff = sorted(
                k for k in set(flat_old) | set(flat_new) if flat_old.get(k) != flat_new.get(k)
            )
            raise ConfigError(
                f"--resume {resume}: config differs from the run's at {', '.join(diff)}"
            )
        return resume
    from kiln.version import __version__ as kiln_version

    exp_id = trk.ensure_experiment(tracking_uri, cfg.experiment.name, cfg.experiment.run_dir)
    tags = {
        trk.TAG_DATASET_HASH: data.dataset_hash,
        trk.TAG_CODE_VERSION: trk.code_version(),
        trk.TAG_KILN_VERSION: kiln_version,
        trk.TAG_DATA_SOURCE: cfg.data.source,
        trk.TAG_JOB: "train",
        "kiln.config_json": json.dumps(cfg.to_dict(), sort_keys=True),
    }
    run_id = trk.start_run(tracking_uri, exp_id, f"train-{cfg.model.name}", tags)
    trk.log_params(tracking_uri, run_id, trk.flatten(cfg.to_dict()))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(cfg.to_yaml())
        trk.log_artifact(tracking_uri, run_id, path)
    return run_id


class _ProgressPoller(threading.Thread):
    """Reads per-epoch metrics back from MLflow while the job runs and hands each new epoch to
    ``progress``."""

    def __init__(self, tracking_uri: str, run_id: str, progress: ProgressFn, interval: float = 1.0):
        super().__init__(daemon=True)
        self.tracking_uri, self.run_id, self.progress, self.interval = (
            tracking_uri,
            run_id,
            progress,
            interval,
        )
        self.stop_event = threading.Event()
        self.seen: set[int] = set()

    def poll(self) -> None:
        try:
            epochs = {m.step for m in trk.metric_history(self.tracking_uri, self.run_id, "epoch")}
            new = sorted(epochs - self.seen)
            if not new:
                return
            history = {
                k: {m.step: m.value for m in trk.metric_history(self.tracking_uri, self.run_id, k)}
                for k in EPOCH_METRICS
            }
            for step in new:
                self.seen.add(step)
                self.progress({"epoch": step, **{k: history[k].get(step) for k in EPOCH_METRICS}})
        except Exception:  # progress is best effort; the run's outcome does not depend on it
            pass

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.poll()

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)
        self.poll()


def per_worker_resources(cfg: TrainingJobConfig) -> dict[str, float]:
    return {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1.0} if cfg.train.use_gpu else {})}


def fit_on_ray(
    cfg: TrainingJobConfig,
    data: PreparedData,
    tracking_uri: str | None,
    run_id: str,
    debug: bool = False,
    resume_from: str | None = None,
    hooks=None,
    callbacks: list | None = None,
    datasets: dict[str, Any] | None = None,
):
    """Run the loop under Ray Train's TorchTrainer. Returns the Ray Train Result.

    ``datasets`` ('train', 'val' Ray Data datasets) default to ``data``'s splits, opened here
    (``open_splits``, cached under ``train.data.cache``).

    ``hooks`` (a LoopHooks) changes the starting model or the loss; ``callbacks`` go to RunConfig
    (e.g. Tune's TuneReportCallback when this runs inside a trial). No MLflow logging when
    ``tracking_uri`` is None.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from kiln.data.dataset import open_splits
    from kiln.ray_connection import check_placement
    from kiln.train.loop import train_loop_per_worker

    t = cfg.train
    per_worker = per_worker_resources(cfg)
    check_placement(t.workers, per_worker)
    ck = t.checkpoint
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": training_sections(cfg),
            "data": ray.put(data),
            "hooks": hooks,
            "tracking": {"uri": tracking_uri, "run_id": run_id} if tracking_uri else None,
            "resume_from": resume_from,
        },
        # Each worker streams its own equal shard of 'train' (one worker: the whole split, no
        # split coordinator); rank 0 reads all of 'val'.
        datasets=datasets or open_splits(data, ("train", "val"), t.data.cache, t.epochs),
        dataset_config=DataConfig(datasets_to_split=["train"] if t.workers > 1 else []),
        scaling_config=ScalingConfig(
            num_workers=t.workers, use_gpu=t.use_gpu, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=f"kiln-{run_id}",
            storage_path=storage_root(cfg),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=ck.keep,
                checkpoint_score_attribute=ck.metric,
                checkpoint_score_order=ck.mode,
            ),
            callbacks=callbacks,
        ),
    )
    with _restoring_sigint_handler():
        return trainer.fit()


@contextmanager
def _restoring_sigint_handler() -> Iterator[None]:
    """Restore the process's SIGINT handler after a fit in the main thread.

    Ray Train (checked on 2.60) installs a SIGINT handler that holds the run's controller actor
    handle and never removes it, so the last controller (and its dataset manager) of a run in the
    main thread stays alive, polling, until the next fit or the process's exit: one run's actors
    leaked per long-lived driver (a notebook, a test session). Putting the handler back releases
    the handle, and Ray ends the actors."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Ray only installs it in the main thread; signal.signal would raise here
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if previous is not None:  # None: set outside Python; it cannot be put back
            signal.signal(signal.SIGINT, previous)


def best_checkpoint_path(result, cfg: TrainingJobConfig) -> str:
    ck = cfg.train.checkpoint
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if m and ck.metric in m]
    if candidates:
        pick = max if ck.mode == "max" else min
        return pick(candidates, key=lambda cm: cm[1][ck.metric])[0].path
    if result.checkpoint is None:
        raise KilnError("training finished without a checkpoint")
    return result.checkpoint.path


def test_confusion(predictor: Any, data: PreparedData, batch_size: int = 2048) -> np.ndarray:
    """Confusion matrix of ``predictor`` (a kiln Predictor) on the whole test split: the sample
    when it holds the whole split, else streamed from Ray Data in batches."""
    if data.sample_is_whole("test"):
        x, y = data.sample("test")
        return confusion_matrix(y, predictor.logits(x).argmax(axis=1), data.num_classes)
    cm = np.zeros((data.num_classes, data.num_classes), np.int64)
    for batch in data.dataset("test").iter_batches(batch_size=batch_size, batch_format="numpy"):
        pred = predictor.logits(batch["x"]).argmax(axis=1)
        cm += confusion_matrix(batch["y"], pred, data.num_classes)
    return cm


def evaluate_test(model_dir: Path, data: PreparedData) -> tuple[dict[str, float], np.ndarray]:
    """Test-split metrics of the saved artifact, loaded the way users load it."""
    from kiln.models.predictor import load_predictor

    cm = test_confusion(load_predictor(model_dir), data)
    return {"test_accuracy": accuracy(cm), "test_f1_macro": f1_macro(cm)}, cm


def log_profile(tracking_uri: str, run_id: str, data: PreparedData, tmp: Path) -> None:
    """Log the data's profile on ``run_id`` (``reference_profile.json``: rows and class counts per
    split, feature or image statistics): the model card's split and class balance come from it."""
    if data.profile is not None:
        (tmp / PROFILE_ARTIFACT).write_text(json.dumps(data.profile.to_dict()))
        trk.log_artifact(tracking_uri, run_id, tmp / PROFILE_ARTIFACT)


def _log_reports(
    tracking_uri: str,
    run_id: str,
    data: PreparedData,
    cm: np.ndarray,
    per_class: list[dict[str, Any]],
    tmp: Path,
) -> None:
    """The run's report artifacts: confusion matrix (PNG), per-class report and, for tabular data,
    the training data's profile (the reference production monitoring compares with)."""
    confusion_matrix_png(cm, data.labels, tmp / "confusion_matrix.png")
    (tmp / "classification_report.json").write_text(json.dumps(per_class, indent=2))
    log_profile(tracking_uri, run_id, data, tmp)
    trk.log_artifact(tracking_uri, run_id, tmp / "confusion_matrix.png")
    trk.log_artifact(tracking_uri, run_id, tmp / "classification_report.json")


def run_training(
    cfg: TrainingJobConfig,
    address: str | None = None,
    resume: str | None = None,
    progress: ProgressFn | None = None,
    debug: bool = False,
) -> TrainResult:
    """Train ``cfg`` on Ray (local instance unless ``address``), evaluate, log and register.

    Raises KilnError for user mistakes and for a failed training job (the run is marked FAILED).
    """
    from kiln.ray_connection import check_placement, ensure_ray

    # Everything that can fail on the user's input fails before an MLflow run exists. The data is
    # read in Ray Data tasks, so Ray comes first, after what can be checked of the data without it.
    check_source(cfg.data)
    ensure_ray(address, debug=debug)
    tracking_uri = trk.resolve_tracking_uri(cfg.experiment.tracking_uri, cfg.experiment.run_dir)
    if resume:  # checked again with the data below; this part before the data is read
        _resumable_run(tracking_uri, resume)
    data = prepare_data(cfg.data)
    check_model_fits_data(cfg, data)
    check_placement(cfg.train.workers, per_worker_resources(cfg))
    run_id = _start_or_resume_run(cfg, data, tracking_uri, resume)
    resume_from = None
    if resume:
        latest = find_latest_checkpoint(Path(storage_root(cfg)) / f"kiln-{run_id}")
        resume_from = str(latest) if latest else None
    poller = _ProgressPoller(tracking_uri, run_id, progress) if progress else None
    try:
        if poller:
            poller.start()
        result = fit_on_ray(cfg, data, tracking_uri, run_id, debug, resume_from)
        if result.error is not None:
            raise result.error
    except KilnError:
        trk.end_run(tracking_uri, run_id, "FAILED")
        raise
    except KeyboardInterrupt:
        trk.end_run(tracking_uri, run_id, "KILLED")
        raise
    except Exception as exc:
        trk.end_run(tracking_uri, run_id, "FAILED")
        raise KilnError(f"training failed: {failure_line(exc)}") from exc
    finally:
        if poller:
            poller.finish()
    return finalize_run(cfg, data, tracking_uri, run_id, result)


def finalize_run(
    cfg: TrainingJobConfig, data: PreparedData, tracking_uri: str, run_id: str, result: Any
) -> TrainResult:
    """Best checkpoint -> model artifact, test metrics, report artifacts, registry version.

    The run is ended FINISHED, or FAILED when any step raises (the error propagates).
    """
    from kiln.version import __version__ as kiln_version

    try:
        ckpt_path = best_checkpoint_path(result, cfg)
        with tempfile.TemporaryDirectory(prefix="kiln-final-") as tmp:
            model_dir = copy_artifact(ckpt_path, Path(tmp) / trk.MODEL_ARTIFACT_PATH)
            test_metrics, cm = evaluate_test(model_dir, data)
            per_class = classification_report(cm, data.labels)
            _log_reports(tracking_uri, run_id, data, cm, per_class, Path(tmp))
            version = register_artifact(
                tracking_uri,
                cfg.experiment.name,
                run_id,
                model_dir,
                tags={
                    trk.TAG_DATASET_HASH: data.dataset_hash,
                    "kiln.variant": "fp32",
                    "kiln.architecture": cfg.model.name,
                    trk.TAG_KILN_VERSION: kiln_version,
                },
                test_metrics=test_metrics,
                # what serving monitors this version against
                write_reference=lambda directory: write_reference(directory, data),
                run_tags={trk.TAG_STORAGE: ckpt_path},
                finish_run=True,
                data_config=cfg.data.portable(),
            ).version
    except Exception:
        trk.end_run(tracking_uri, run_id, "FAILED")
        raise
    epochs: dict[float, dict[str, float]] = {}
    for key in EPOCH_METRICS:
        for m in trk.metric_history(tracking_uri, run_id, key):
            epochs.setdefault(m.step, {"epoch": int(m.step)})[key] = m.value
    resumed = [m.value for m in trk.metric_history(tracking_uri, run_id, "resumed_at_epoch")]
    return TrainResult(
        run_id=run_id,
        tracking_uri=tracking_uri,
        model_uri=f"models:/{cfg.experiment.name}/{version}",
        model_name=cfg.experiment.name,
        model_version=version,
        dataset_hash=data.dataset_hash,
        checkpoint=ckpt_path,
        metrics={
            **{k: float(v) for k, v in (result.metrics or {}).items() if k in EPOCH_METRICS},
            **test_metrics,
        },
        epochs=[epochs[k] for k in sorted(epochs)],
        per_class=per_class,
        split_sizes=data.sizes(),
        resumed_from_epoch=int(resumed[-1]) if resumed else None,
    )
