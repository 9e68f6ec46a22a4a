"""Starting and steering rollouts from a driver (the CLI, or a monitoring loop), and the two hooks
``kiln serve start | stop`` run (``restore_rollouts``, ``stop_controllers``; the commands layer
hands them to ``kiln.serve.lifecycle``, which does not import this module).

``start_rollout`` checks what the run dir tells before it touches the cluster (the options make
sense, the model is served, the version is not the stable one) and raises KilnError otherwise; then
it hands the rollout to the model's controller actor (creating it if needed), which checks that the
version exists in the registry and answers the error in the same call. Loading the candidate (its
artifact, runtime and builder, checked against the operator's allow-list where it runs) is the
replicas' work: a candidate that fails to load is rolled back before it gets traffic, which
``kiln rollout status --watch`` shows. So the command returns in seconds: no MLflow, no Ray Serve
in its process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import KilnError
from kiln.rollout.control.controller import RolloutController
from kiln.rollout.core.actors import NAMESPACE, controller_name, find_controller
from kiln.rollout.core.spec import RolloutOptions
from kiln.rollout.core.store import Phase, RolloutRecord, RolloutStore
from kiln.serve.cluster import connect, find_target
from kiln.serve.instance import ServeState

if TYPE_CHECKING:
    from kiln.serve.plan import ModelPlan, ServePlan


@dataclass
class RolloutStatus:
    """The record, the last interval's metrics per version, the last gate values and decision, and
    the live replicas with the versions they have ready. ``live``: whether the controller
    answered."""

    record: dict[str, Any] | None
    metrics: dict[str, Any]
    gates: dict[str, Any]
    decision: dict[str, Any]
    replicas: dict[str, Any]
    live: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def connect_to_serving(
    run_dir: str | Path, address: str | None, debug: bool = False
) -> ServeState | None:
    """Connect (unless this process is already connected); returns the serve state file (or
    None). Raises KilnError when there is nothing to connect to. Ray Serve is not imported: the
    rollout's driver only calls the controller actor."""
    import ray

    address, state = find_target(run_dir, address)
    if not ray.is_initialized():
        connect(address, debug, serve=False)
    return state


def controller_for(run_dir: str | Path, model: str, tracking_uri: str | None = None) -> Any:
    """The model's controller actor handle: the running one, else a new detached one (it reloads
    the record; ``tracking_uri``: the registry it opens as it starts, so that its first rollout
    finds MLflow ready)."""
    import ray

    actor = ray.remote(RolloutController).options(
        name=controller_name(model),
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
        max_task_retries=-1,
        max_concurrency=64,
    )
    return actor.remote(str(Path(run_dir).expanduser().resolve()), model, tracking_uri)


def start_rollout(
    run_dir: str | Path,
    address: str | None,
    model: str,
    to_version: str,
    strategy: str,
    options: RolloutOptions,
    trigger: str = "user",
    debug: bool = False,
) -> RolloutRecord:
    """Roll ``model`` (a served name) out to registry version ``to_version`` with ``strategy``.

    ``trigger`` (user | monitor | ...) is recorded in the audit log. Returns the new record; raises
    KilnError when the model is not served, the version is unknown, the options are wrong, or a
    rollout of that model is already in progress. The candidate is loaded afterwards, by the
    replicas (the record's phase is ``preparing`` until every replica has it).
    """
    steps, shadow, gates = options.plan(strategy)
    address, state = find_target(run_dir, address)  # what the run dir tells, before Ray
    served = [m for m in (state.models if state else []) if m["name"] == model]
    if state is None or not served:
        names = sorted({m["name"] for m in state.models}) if state else []
        raise KilnError(
            f"model '{model}' is not served from {run_dir} (served: "
            f"{', '.join(names) or 'nothing'})"
        )
    previous = RolloutStore(run_dir, model).load()
    if previous is not None:
        stable, stable_uri = previous.stable, previous.stable_uri
    else:
        default = next((m for m in served if m.get("default")), served[0])
        stable, stable_uri = default["version"], default.get("uri") or ""
    if not stable_uri.startswith("models:/"):
        raise KilnError(
            f"the serve state of '{model}' lacks registry URIs (started by an older Kiln); restart "
            "serving with 'kiln serve stop' and 'kiln serve start'"
        )
    registered = stable_uri[len("models:/") :].split("/")[0]
    tracking_uri = state.tracking_uri
    if not tracking_uri:
        raise KilnError(
            f"the serve state of '{model}' lacks its registry (started by an older Kiln); restart "
            "serving with 'kiln serve stop' and 'kiln serve start'"
        )
    to_version = str(to_version).lstrip("v")
    if to_version == stable:
        raise KilnError(f"v{to_version} is already the stable version of '{model}'")
    candidate_uri = f"models:/{registered}/{to_version}"
    record = RolloutRecord(
        model=model,
        registered_name=registered,
        tracking_uri=tracking_uri,
        stable=stable,
        stable_uri=stable_uri,
        candidate=to_version,
        candidate_uri=candidate_uri,
        strategy=strategy,
        steps=steps,
        shadow=shadow,
        bake_s=options.bake_s,
        interval_s=options.interval_s,
        gates=[g.expr for g in gates],
        sticky_header=options.sticky_header,
    )
    import ray  # only now: the mistakes above are told without it (a second or more to import)

    if not ray.is_initialized():
        connect(address, debug, serve=False)
    controller = controller_for(run_dir, model, tracking_uri)
    result = ray.get(controller.start.remote(record.to_dict(), trigger))
    if "error" in result:
        raise KilnError(result["error"])
    return RolloutRecord.from_dict(result)


def rollout_command(
    run_dir: str | Path,
    address: str | None,
    model: str,
    action: str,
    trigger: str = "user",
    debug: bool = False,
) -> RolloutRecord:
    """promote | rollback | pause | resume the rollout of ``model``. Raises KilnError."""
    import ray

    connect_to_serving(run_dir, address, debug)
    if RolloutStore(run_dir, model).load() is None:
        raise KilnError(f"no rollout of '{model}' is recorded in {run_dir}")
    result = ray.get(controller_for(run_dir, model).command.remote(action, trigger))
    if "error" in result:
        raise KilnError(result["error"])
    return RolloutRecord.from_dict(result)


def rollout_status(
    run_dir: str | Path, address: str | None, model: str, debug: bool = False
) -> RolloutStatus:
    """Live status from the controller; the persisted record alone (``live`` False) when nothing
    serves or the controller does not answer. Raises KilnError when no rollout is recorded."""
    import ray
    from ray.exceptions import RayError

    store = RolloutStore(run_dir, model)
    record = store.load()
    if record is None:
        raise KilnError(f"no rollout of '{model}' is recorded in {run_dir}")
    try:
        connect_to_serving(run_dir, address, debug)
        live = ray.get(controller_for(run_dir, model).status.remote(), timeout=10)
    except (KilnError, RayError):  # nothing serving, or no answer (GetTimeoutError is a RayError)
        return RolloutStatus(
            record=record.to_dict(), metrics={}, gates={}, decision={}, replicas={}, live=False
        )
    return RolloutStatus(
        record=live["record"],
        metrics=live["metrics"],
        gates=live["gates"],
        decision=live["decision"],
        replicas=live["replicas"],
        live=True,
    )


def rollout_history(run_dir: str | Path, model: str) -> list[dict[str, Any]]:
    """The audit log, oldest first (read from the run dir: no cluster needed). Raises KilnError."""
    store = RolloutStore(run_dir, model)
    if store.load() is None and not store.audit_path.is_file():
        raise KilnError(f"no rollout of '{model}' is recorded in {run_dir}")
    return store.history()


def stop_controllers(models: list[str]) -> None:
    """Kill the controllers of ``models`` (when serving stops); their records stay on disk. The
    ``on_stop`` hook of ``kiln serve stop``."""
    import ray

    for model in models:
        actor = find_controller(model)
        if actor is not None:
            ray.kill(actor, no_restart=True)


def served_version_overrides(run_dir: str | Path, model: str) -> RolloutRecord | None:
    """For ``kiln serve start``: the model's record (its ``stable`` is the version to come back on).
    A rollout that was in progress when serving stopped (its controller is gone) is recorded as
    aborted. Errors other than "no controller" (say, the cluster does not answer) propagate and
    leave the record as it was."""
    store = RolloutStore(run_dir, model)
    record = store.load()
    if record is None:
        return None
    if record.active and find_controller(model) is None:
        record.phase, record.weight, record.finished_at = Phase.ABORTED, 0.0, time.time()
        record.reason = "serving restarted while the rollout was in progress"
        record.revision += 1
        store.save(record)
        store.audit(
            {
                "step": record.step,
                "phase": record.phase,
                "weights": {record.stable: 100.0},
                "shadow": 0.0,
                "gates": {},
                "decision": "abort",
                "trigger": "serve-start",
                "reason": record.reason,
            }
        )
    return record


def supersede(run_dir: str | Path, record: RolloutRecord, version: str, uri: str) -> RolloutRecord:
    """``kiln serve start`` named ``version``, newer than the record's stable one: the user's
    explicit choice wins. The record restarts from it (idle, nothing to roll back to), and the audit
    log says so. Returns the record."""
    old = record.stable
    record.stable, record.stable_uri, record.phase = version, uri, Phase.IDLE
    record.candidate = record.candidate_uri = record.previous = record.previous_uri = None
    record.weight, record.step, record.revision = 0.0, -1, record.revision + 1
    record.reason = f"serving started on v{version}, newer than the last promoted v{old}"
    store = RolloutStore(run_dir, record.model)
    store.save(record)
    store.audit(
        {
            "step": -1,
            "phase": record.phase,
            "weights": {version: 100.0},
            "shadow": 0.0,
            "gates": {},
            "decision": "supersede",
            "trigger": "serve-start",
            "reason": record.reason,
        }
    )
    return record


def restore_rollouts(plan: ServePlan, run_dir: str | Path) -> ServePlan:
    """The ``restore`` hook of ``kiln serve start``: serve each model on the stable version its
    rollout record names (the last promoted one, or the one a rollback returned to), loading it even
    when the config does not list it; unless the config names a newer registry version as the
    default, which then supersedes the record. Needs a Ray connection (to tell a rollout in
    progress from one whose controller is gone). Each model's controller is started here (idle until
    a rollout), so that a later ``kiln rollout start`` finds it running with the registry open.
    Returns the plan; raises ModelError when the record's version is no longer a Kiln artifact."""
    import ray

    for model in plan.models:
        _restore(plan, model, run_dir)
        # After the record's last change here: the controller loads it as it starts. Only on a
        # connection (`kiln serve start` has one; a bare call would start a Ray instance).
        if ray.is_initialized():
            controller_for(run_dir, model.name, plan.tracking_uri)
    return plan


def _restore(plan: ServePlan, model: ModelPlan, run_dir: str | Path) -> None:
    """One model of ``restore_rollouts``: its record's stable version becomes the plan's default
    (loaded even when the config does not list it), unless the config supersedes it."""
    from kiln import tracking as trk
    from kiln.models.spec import load_spec
    from kiln.serve.plan import VersionSource

    record = served_version_overrides(run_dir, model.name)
    if record is None or not record.stable_uri:
        return
    named = model.default_version
    if (
        named.isdigit()
        and record.stable.isdigit()
        and int(named) > int(record.stable)
        and not record.active
    ):
        supersede(run_dir, record, named, next(v.uri for v in model.versions if v.version == named))
        return
    if record.stable not in {v.version for v in model.versions}:
        model.versions.append(VersionSource(record.stable, record.stable_uri))
        spec = load_spec(
            trk.resolve_model_dir(record.stable_uri, plan.tracking_uri), record.stable_uri
        )
        model.formats[record.stable] = spec.format
    model.default_version = record.stable
