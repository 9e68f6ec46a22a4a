"""Warm starts: seed a new sweep's Optuna searcher with the trials of a finished one.

``kiln tune CONFIG --warm-start SWEEP_DIR_OR_RUN`` reads the source sweep's ``results.json`` (from
its folder, or through the sweep's MLflow parent run), keeps each trial whose values lie inside the
new space (and whose unsearched keys match the new config), and adds them to the Optuna study that
Ray Tune's ``OptunaSearch`` loads, as the live searcher would have recorded them: Ray's OptunaSearch
tells Optuna a trial ASHA stopped as COMPLETE with its last value, so the warm trials are told the
same way. TPE then models the space from the first new trial on (when there are at least
``startup_trials`` warm trials) instead of sampling its start-up trials at random.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln import tracking as trk
from kiln.errors import KilnError
from kiln.tune.config import Objective
from kiln.tune.space import Dimension

STUDY_NAME = "kiln"  # the name OptunaSearch loads the seeded study by
RESULTS_FILE = "results.json"
USABLE = ("completed", "stopped_early")  # trials whose last values a searcher was told


@dataclass
class WarmTrial:
    number: int
    encoded: dict[str, Any]  # params as Optuna stores them, for the new space
    values: list[float]


@dataclass
class WarmStart:
    """The trials of a previous sweep that seed this one, and those left out (with the reason)."""

    source: str  # what the user gave: a folder or a run id
    sweep_dir: str | None
    run_id: str | None  # the source sweep's MLflow parent run
    trials: list[WarmTrial] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def lineage(self) -> dict[str, Any]:
        """What the sweep records of its warm start (sweep.json, results.json, --json)."""
        return {
            "source": self.source,
            "sweep_dir": self.sweep_dir,
            "run_id": self.run_id,
            "trials_used": [t.number for t in self.trials],
            "skipped": [{"trial": n, "reason": r} for n, r in self.skipped],
        }

    def summary(self) -> str:
        """One line for the progress output."""
        text = f"warm start from {self.sweep_dir or self.run_id}: {len(self.trials)} trial(s) used"
        if self.skipped:
            shown = "; ".join(f"trial {n}: {r}" for n, r in self.skipped[:5])
            more = f"; and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            text += f", {len(self.skipped)} skipped ({shown}{more})"
        return text


def _read_source(source: str, tracking_uri: str) -> tuple[dict, str | None, str | None]:
    """(results.json, the source sweep's folder, its parent run id).

    Raises KilnError when ``source`` is neither a finished sweep's folder nor a sweep's run id.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        results, state = path / RESULTS_FILE, path / "sweep.json"
        if not results.is_file():
            raise KilnError(
                f"--warm-start: {path} holds no {RESULTS_FILE} (not a finished sweep's folder)"
            )
        try:
            data = json.loads(results.read_text())
            meta = json.loads(state.read_text()) if state.is_file() else {}
        except (OSError, ValueError) as exc:
            raise KilnError(f"--warm-start: cannot read {results}: {exc}") from None
        return data, str(path.resolve()), meta.get("parent_run_id")
    if path.exists() or "/" in source or not source.isalnum():
        raise KilnError(
            f"--warm-start: {source} is neither a sweep folder nor a sweep's MLflow run id"
        )
    try:
        run = trk.get_run(tracking_uri, source)
    except KilnError:
        raise KilnError(
            f"--warm-start: {source} is neither a sweep folder nor a sweep's MLflow run id "
            f"(no such run in {tracking_uri})"
        ) from None
    if run.data.tags.get(trk.TAG_JOB) != "tune":
        raise KilnError(f"--warm-start: MLflow run {source} is not a sweep's run")
    try:
        data = json.loads(trk.read_artifact_text(tracking_uri, source, RESULTS_FILE))
    except KilnError:
        raise KilnError(
            f"--warm-start: sweep run {source} has no {RESULTS_FILE} (the sweep did not finish)"
        ) from None
    return data, run.data.tags.get("kiln.tune.sweep_dir"), source


def _encode(dim: Dimension, value: Any) -> tuple[Any, str | None]:
    """(Optuna's value for ``value`` in ``dim``, None) or (None, why it is outside ``dim``)."""
    if dim.kind == "choice":
        matches = [c for c in dim.choices if json.dumps(c) == json.dumps(value)]
        if not matches:
            return None, f"{dim.key}={value!r} is not one of {list(dim.choices)}"
        return dim.encoded_choices[dim.choices.index(matches[0])], None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"{dim.key}={value!r} is not a number"
    low, high = dim.bounds()
    if dim.kind == "int" and float(value) != int(value):
        return None, f"{dim.key}={value!r} is not a whole number"
    if not low <= value <= high:
        return None, f"{dim.key}={value:g} is outside [{low:g}, {high:g}]"
    return (int(value) if dim.kind == "int" else float(value)), None


def _get_dotted(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def load_warm_start(
    source: str,
    dims: list[Dimension],
    objectives: list[Objective],
    base_config: dict[str, Any],
    tracking_uri: str,
) -> WarmStart:
    """The source sweep's trials that fit this sweep's space and objectives.

    ``base_config`` is the train config every new trial starts from: a source trial that searched a
    key this sweep does not search is used only when its value equals this config's.
    Raises KilnError for a source that is not a finished sweep, or when no trial fits.
    """
    data, sweep_dir, run_id = _read_source(source, tracking_uri)
    warm = WarmStart(source=source, sweep_dir=sweep_dir, run_id=run_id)
    by_key = {d.key: d for d in dims}
    for trial in data.get("trials") or []:
        number = int(trial.get("number", 0))
        reason = _why_not(trial, dims, by_key, objectives, base_config)
        if reason is not None:
            warm.skipped.append((number, reason))
            continue
        encoded = {d.key: _encode(d, trial["params"][d.key])[0] for d in dims}
        values = [float(trial["metrics"][o.metric]) for o in objectives]
        warm.trials.append(WarmTrial(number, encoded, values))
    if not warm.trials:
        raise KilnError(
            f"--warm-start: none of the {len(warm.skipped)} trial(s) of {source} fits this sweep"
            + (f" ({warm.skipped[0][1]}, ...)" if warm.skipped else "")
        )
    return warm


def _why_not(
    trial: dict[str, Any],
    dims: list[Dimension],
    by_key: dict[str, Dimension],
    objectives: list[Objective],
    base_config: dict[str, Any],
) -> str | None:
    """Why a source trial cannot seed this sweep, or None when it can."""
    if trial.get("status") not in USABLE:
        return f"status {trial.get('status')}"
    params, metrics = trial.get("params") or {}, trial.get("metrics") or {}
    for o in objectives:
        value = metrics.get(o.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"no {o.metric}"
    for d in dims:
        if d.key not in params:
            return f"{d.key} was not searched (its value is unknown)"
        _, why = _encode(d, params[d.key])
        if why is not None:
            return why
    for key, value in params.items():
        if key not in by_key and _get_dotted(base_config, key) != value:
            return f"{key}={value!r} is not searched here and differs from this config's"
    return None


def seeded_storage(warm: WarmStart, dims: list[Dimension], objectives: list[Objective]):
    """An in-memory Optuna storage holding study ``STUDY_NAME`` with the warm trials, for
    ``OptunaSearch(storage=..., study_name=STUDY_NAME)`` (which loads an existing study)."""
    import optuna
    from optuna.trial import TrialState, create_trial

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(
        storage=storage,
        study_name=STUDY_NAME,
        directions=["maximize" if o.mode == "max" else "minimize" for o in objectives],
    )
    distributions = {d.key: d.distribution() for d in dims}
    for t in warm.trials:
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE,
                values=t.values,
                params=t.encoded,
                distributions=distributions,
                user_attrs={"kiln_warm_start_trial": t.number},
            )
        )
    return storage
