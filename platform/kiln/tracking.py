"""The one place that talks to MLflow: runs, params, metrics, artifacts, the model registry."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kiln.errors import KilnError, ModelError, first_line

# MLFLOW_LOGGING_LEVEL and MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR, which MLflow reads at import, are
# set by the entry points (kiln.cli.configure_process), not here.

TAG_DATASET_HASH = "kiln.dataset_hash"
TAG_CODE_VERSION = "kiln.code_version"
TAG_KILN_VERSION = "kiln.version"
TAG_DATA_SOURCE = "kiln.data_source"
TAG_STORAGE = "kiln.storage_path"
TAG_JOB = "kiln.job"
TAG_WORKER_NODES = "kiln.worker_nodes"  # JSON list: the Ray node each training rank ran on
MODEL_ARTIFACT_PATH = "model"


def quiet_mlflow() -> None:
    """MLflow and alembic log schema migrations and hints at INFO; keep the user's terminal
    clean (MLflow resets its logger's level when it is imported, so this runs after that)."""
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def default_tracking_uri(run_dir: str | Path) -> str:
    """A sqlite store inside ``run_dir`` (MLflow 3 refuses plain file stores by default)."""
    path = Path(run_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None, run_dir: str | Path) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else the sqlite default in ``run_dir``."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(run_dir)


_READY_STORES: set[str] = set()


def client(tracking_uri: str):
    """An MlflowClient for tracking and registry. A sqlite store is created under a file lock:
    two processes creating the same fresh store at once would race on its schema migrations."""
    quiet_mlflow()
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:") and tracking_uri not in _READY_STORES:
        import fcntl

        db = Path(tracking_uri.split("sqlite:///", 1)[-1])
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.parent / f".{db.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            c = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            c.search_experiments(max_results=1)  # creates / migrates the tracking tables
            c.search_registered_models(max_results=1)  # and the registry's
        _READY_STORES.add(tracking_uri)
        return c
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def is_local_store(tracking_uri: str) -> bool:
    return tracking_uri.startswith("sqlite:") or tracking_uri.startswith("file:")


def ensure_experiment(tracking_uri: str, name: str, run_dir: str | Path) -> str:
    """Experiment id for ``name``, creating it (artifacts beside a local store, not in ./mlruns)."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if is_local_store(tracking_uri):
        location = (Path(run_dir).expanduser().resolve() / "artifacts").as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return c.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def code_version() -> str:
    """git sha of the working tree (``-dirty`` when modified), or 'unknown' outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return os.environ.get("KILN_CODE_VERSION", "unknown")
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("KILN_CODE_VERSION", "unknown")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out


def start_run(
    tracking_uri: str,
    experiment_id: str,
    run_name: str,
    tags: dict[str, str],
    parent_run_id: str | None = None,
) -> str:
    """Create an MLflow run and return its id."""
    tags = dict(tags)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    tags.setdefault("mlflow.runName", run_name)
    run = client(tracking_uri).create_run(experiment_id, run_name=run_name, tags=tags)
    return run.info.run_id


def log_params(tracking_uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    c = client(tracking_uri)
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(
    tracking_uri: str, run_id: str, metrics: dict[str, float], step: int | None = None
) -> None:
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
    client(tracking_uri).log_batch(run_id, metrics=items)


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, Any]) -> None:
    c = client(tracking_uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


def log_artifacts(
    tracking_uri: str, run_id: str, local_dir: str | Path, artifact_path: str | None = None
) -> None:
    client(tracking_uri).log_artifacts(run_id, str(local_dir), artifact_path)


def log_artifact(
    tracking_uri: str, run_id: str, local_file: str | Path, artifact_path: str | None = None
) -> None:
    client(tracking_uri).log_artifact(run_id, str(local_file), artifact_path)


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status)


def get_run(tracking_uri: str, run_id: str):
    """The MLflow run, or KilnError when there is none with that id (or the store does not
    answer)."""
    from mlflow.exceptions import MlflowException

    try:
        return client(tracking_uri).get_run(run_id)
    except MlflowException:
        raise KilnError(f"no MLflow run '{run_id}' in {tracking_uri}") from None


def search_runs(tracking_uri: str, experiment_id: str, filter_string: str = "") -> list:
    """Runs of one experiment matching an MLflow filter (e.g. on tags), newest first."""
    return client(tracking_uri).search_runs(
        [experiment_id], filter_string=filter_string, max_results=5000
    )


def metric_history(tracking_uri: str, run_id: str, key: str) -> list:
    return client(tracking_uri).get_metric_history(run_id, key)


def register_model(
    tracking_uri: str,
    name: str,
    run_id: str,
    artifact_path: str = MODEL_ARTIFACT_PATH,
    tags: dict[str, Any] | None = None,
    description: str | None = None,
) -> str:
    """Register the run's artifact folder as a new version of ``name``; returns the version."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    try:
        c.create_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(
            exc
        ):
            raise
    source = f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    mv = c.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags={k: str(v) for k, v in (tags or {}).items()},
        description=description,
    )
    return str(mv.version)


def set_alias(tracking_uri: str, name: str, alias: str, version: str) -> None:
    client(tracking_uri).set_registered_model_alias(name, alias, version)


def model_version_for(tracking_uri: str, uri: str):
    """The registry ModelVersion behind ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``. Raises
    ModelError when the URI names no version or the registry has none such."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    body = uri[len("models:/") :]
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return c.get_model_version_by_alias(name, alias)
        name, _, version = body.partition("/")
        if not version:
            raise ModelError(
                f"model URI '{uri}' names no version (use models:/NAME/VERSION or "
                "models:/NAME@ALIAS)"
            )
        return c.get_model_version(name, version)
    except MlflowException:
        raise ModelError(f"unknown model '{uri}' in registry {tracking_uri}") from None


_DOWNLOADS: dict[tuple[str, str], Path] = {}


def resolve_model_dir(model: str, tracking_uri: str | None = None) -> Path:
    """Local folder of a model artifact from a path, ``models:/`` or ``runs:/`` URI, or a bare run
    id.

    Registry and run artifacts are downloaded once per process. Raises ModelError.
    """
    local = Path(model).expanduser()
    if "://" not in model and ":/" not in model and local.is_dir():
        return local
    tracking_uri = (
        tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri("runs")
    )
    key = (tracking_uri, model)
    if key in _DOWNLOADS and _DOWNLOADS[key].is_dir():
        return _DOWNLOADS[key]
    c = client(tracking_uri)
    if model.startswith("models:/"):
        mv = model_version_for(tracking_uri, model)
        source = mv.source
    elif model.startswith("runs:/"):
        run_id, _, inner = model[len("runs:/") :].partition("/")
        run = get_run_or_model_error(c, run_id, model)
        source = f"{run.info.artifact_uri.rstrip('/')}/{inner or MODEL_ARTIFACT_PATH}"
    else:
        run = get_run_or_model_error(c, model, model)
        source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    dest = Path(tempfile.mkdtemp(prefix="kiln-model-"))
    # A process's downloads live as long as the process (its cache above), not past it.
    atexit.register(shutil.rmtree, dest, ignore_errors=True)
    try:
        path = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(dest), tracking_uri=tracking_uri
            )
        )
    except (MlflowException, OSError) as exc:
        raise ModelError(f"cannot download model '{model}' ({first_line(exc)})") from None
    _DOWNLOADS[key] = path
    return path


def read_artifact_text(tracking_uri: str, run_id: str, artifact_path: str) -> str:
    """The text of one file logged on run ``run_id``. Raises KilnError when it cannot be read."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="kiln-artifact-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact_path, dst_path=tmp, tracking_uri=tracking_uri
            )
            return Path(path).read_text()
        except (MlflowException, OSError) as exc:
            raise KilnError(
                f"cannot read {artifact_path} of run {run_id} ({first_line(exc)})"
            ) from None


def get_run_or_model_error(c, run_id: str, what: str):
    """The run ``run_id`` through client ``c``; ModelError naming ``what`` when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_run(run_id)
    except MlflowException:
        raise ModelError(f"unknown model '{what}': no such run") from None


def iter_model_versions(tracking_uri: str, name: str) -> Iterable:
    return client(tracking_uri).search_model_versions(f"name='{name}'")
