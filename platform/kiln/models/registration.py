"""The one way a model artifact becomes a registry version.

``kiln train``, ``kiln tune`` (the best trial, or each Pareto-front member), ``kiln compress``
(every variant) and the test helpers all call ``register_artifact``. Steps that belong to higher
layers come in from the caller: the test-split metrics it computed (train, tune) and the writer of
the monitoring reference that serving compares live traffic with
(``kiln.monitor.reference.write_reference``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kiln import tracking as trk
from kiln.errors import ModelError
from kiln.models.artifact import artifact_files
from kiln.models.card import store_card
from kiln.models.spec import SPEC_FILE

MLMODEL_FILE = "MLmodel"
TAG_MODEL_VERSION = "kiln.model_version"  # on the run: the registry version it produced
TAG_DATA_CONFIG = "kiln.data_config"  # on the version: its data section (JSON)

WriteReference = Callable[[Path], object]


@dataclass(frozen=True)
class Registration:
    """A registry version made by ``register_artifact``."""

    name: str
    version: str
    test_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        """``models:/NAME/VERSION``."""
        return f"models:/{self.name}/{self.version}"


def copy_artifact(source: str | Path, destination: str | Path) -> Path:
    """Copy the model artifact inside ``source`` (a training checkpoint or an artifact folder):
    spec.json, the weight files the spec names, and the MLmodel file. Optimizer and scheduler
    state stay behind. Returns ``destination``; raises ModelError when ``source`` holds no spec.
    """
    source, destination = Path(source), Path(destination)
    if not (source / SPEC_FILE).is_file():
        raise ModelError(f"{source} holds no model artifact (no {SPEC_FILE})")
    destination.mkdir(parents=True, exist_ok=True)
    for path in [*artifact_files(source), source / MLMODEL_FILE]:
        shutil.copy2(path, destination / path.name)
    return destination


def register_artifact(
    tracking_uri: str,
    name: str,
    run_id: str,
    model_dir: Path,
    *,
    tags: Mapping[str, object],
    test_metrics: Mapping[str, float] | None = None,
    write_reference: WriteReference | None = None,
    metrics: Mapping[str, float] | None = None,
    run_tags: Mapping[str, object] | None = None,
    description: str | None = None,
    finish_run: bool = False,
    data_config: Mapping[str, object] | None = None,
) -> Registration:
    """Register the artifact folder ``model_dir`` as a new version of ``name``, from run ``run_id``.

    In order: ``write_reference(model_dir)`` (the monitoring reference, written into the folder
    before it is logged), ``test_metrics`` and ``metrics`` logged on the run (``test_accuracy`` of
    ``test_metrics`` also becomes a version tag), the folder logged as the run's
    ``model`` artifact, the version created with ``tags``, then the run tagged with
    ``kiln.model_version`` (and ``run_tags``), the version's model card logged on the run
    (``kiln.models.card.store_card``) and, with ``finish_run``, the run ended as FINISHED.
    ``data_config`` (the ``data`` section the version was trained and split on) becomes the
    version tag ``kiln.data_config`` (JSON), which ``kiln compress`` uses when its config sets no
    ``data``.

    Returns the Registration. Raises whatever ``write_reference`` or MLflow raise; the caller
    decides the run's status on failure.
    """
    evaluated = {k: float(v) for k, v in (test_metrics or {}).items()}
    if write_reference is not None:
        write_reference(model_dir)
    logged = {**evaluated, **(metrics or {})}
    if logged:
        trk.log_metrics(tracking_uri, run_id, logged)
    trk.log_artifacts(tracking_uri, run_id, model_dir, trk.MODEL_ARTIFACT_PATH)
    version_tags = dict(tags)
    if data_config is not None:
        version_tags[TAG_DATA_CONFIG] = json.dumps(data_config, sort_keys=True)
    if "test_accuracy" in evaluated:
        version_tags["test_accuracy"] = f"{evaluated['test_accuracy']:.4f}"
    version = trk.register_model(
        tracking_uri, name, run_id, tags=version_tags, description=description
    )
    trk.set_tags(tracking_uri, run_id, {TAG_MODEL_VERSION: version, **(run_tags or {})})
    store_card(tracking_uri, name, version, run_id)
    if finish_run:
        trk.end_run(tracking_uri, run_id, "FINISHED")
    return Registration(name=name, version=version, test_metrics=evaluated)
