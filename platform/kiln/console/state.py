"""What the console page shows, gathered from the functions the CLI uses: the serve state file and
Serve's application status (``kiln serve status``), the rollout status and audit log (``kiln
rollout status|history``), each model's monitor report (``kiln monitor status``, asked of a replica
through its deployment handle), the registry (``kiln.models.card.version_facts``), and Kiln's
serving metrics as time series (``kiln.console.metrics``).

Runs in the root app's replica; ``ConsoleData`` keeps the history the series are drawn from for as
long as that replica lives.
"""

from __future__ import annotations

import logging
import time
import urllib.error
from typing import Any

from kiln.console.metrics import MetricsHistory, scrape
from kiln.errors import KilnError, first_line

logger = logging.getLogger("kiln.console")

# What the page shows of a version's registry facts (run tags and the config stay out of the page).
FACT_KEYS = (
    "aliases",
    "variant",
    "variant_name",
    "format",
    "architecture",
    "size_bytes",
    "test_accuracy",
    "parent_version",
    "run_id",
    "registered_at",
)
FACTS_TTL_S = 10.0  # registry facts (aliases move on promotion) are asked again after this
AUDIT_TAIL = 40  # audit entries sent to the page
MONITOR_POINTS = 360  # drift / OOD points kept per version
ENDINGS = ("promote", "rollback", "abort", "supersede")


def gate_rows(gates: dict[str, Any]) -> list[dict[str, Any]]:
    """A gate table (``expr -> {value, ok}``) as rows with the signal, comparison and threshold
    split out, and the result as text (readable without colour)."""
    from kiln.rollout.core.spec import parse_gate

    rows = []
    for expr, g in gates.items():
        try:
            gate = parse_gate(expr)
            signal, op, threshold = gate.signal, gate.op, gate.threshold
        except KilnError:  # a record written by another Kiln: show it as it is
            signal, op, threshold = expr, "", None
        ok = g.get("ok")
        rows.append(
            {
                "gate": expr,
                "signal": signal,
                "op": op,
                "threshold": threshold,
                "value": g.get("value"),
                "ok": ok,
                "result": {True: "PASS", False: "FAIL", None: "NO DATA"}[ok],
            }
        )
    return rows


def planned_schedule(record: dict[str, Any], now: float) -> list[dict[str, Any]]:
    """The candidate's planned weight from its current step on, as the points of a step chart:
    the current step from when it started, each later step at the earliest time the plan allows
    (the current step's bake time not yet baked counts from ``now``, every later step bakes
    ``bake_s``), and 100 at the promotion that follows the last step. [] when no rollout is
    active or the plan has no steps."""
    steps = [float(s) for s in record.get("steps") or []]
    if record.get("phase") not in ("preparing", "running", "paused") or not steps:
        return []
    step = max(int(record.get("step", -1)), 0)
    bake = float(record.get("bake_s") or 0.0)
    started = float(record.get("step_started_at") or 0.0) or now
    if int(record.get("step", -1)) < 0:  # preparing: the first step starts once the candidate is up
        started = now
    end = now + max(bake - float(record.get("baked_s") or 0.0), 0.0)
    points = [{"t": min(started, now), "weight": steps[step]}]
    for weight in steps[step + 1 :]:
        points.append({"t": end, "weight": weight})
        end += bake
    points.append({"t": end, "weight": 100.0})  # the promotion: the candidate takes all traffic
    return points


def rollout_view(
    status: dict[str, Any], entries: list[dict[str, Any]], now: float | None = None
) -> dict[str, Any]:
    """The rollout panel: the record, the current gates, the weight steps (planned, as they went,
    and the plan from the current step on: ``planned_schedule``), the gate values per interval
    and the audit log since the last start, and the finished rollouts."""
    record = status.get("record") or {}
    starts = [i for i, e in enumerate(entries) if e.get("decision") == "start"]
    current = entries[starts[-1] :] if starts else []
    candidate = record.get("candidate")
    weights = [
        {"t": e["time"], "weight": float((e.get("weights") or {}).get(candidate, 0.0))}
        for e in current
        if candidate
    ]
    intervals = [
        {"t": e["time"], "decision": e.get("decision"), "gates": gate_rows(e.get("gates") or {})}
        for e in current
        if e.get("gates")
    ]
    finished = [
        {
            "t": e["time"],
            "decision": e.get("decision"),
            "trigger": e.get("trigger"),
            "reason": e.get("reason", ""),
            "weights": e.get("weights", {}),
        }
        for e in entries
        if e.get("decision") in ENDINGS
    ]
    candidate_metrics = (status.get("metrics") or {}).get(candidate or "", {})
    return {
        "record": record,
        "live": status.get("live", False),
        "active": record.get("phase") in ("preparing", "running", "paused"),
        "planned": record.get("steps", []),
        "schedule": planned_schedule(record, time.time() if now is None else now),
        "weights": weights,
        "gates": gate_rows(status.get("gates") or {}),
        "intervals": intervals[-AUDIT_TAIL:],
        "agreement": candidate_metrics.get("agreement"),
        "metrics": status.get("metrics") or {},
        "decision": status.get("decision") or {},
        "replicas": status.get("replicas") or {},
        "audit": entries[-AUDIT_TAIL:],
        "finished": finished[-AUDIT_TAIL:],
    }


class ConsoleData:
    """Gathers the page's JSON; keeps the metric snapshots and monitor points between polls."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.metrics = MetricsHistory()
        self.metrics_error: str | None = None  # the last scrape's failure, shown on the page
        self.monitor_points: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._facts: dict[str, tuple[float, dict[str, Any]]] = {}
        self._handles: dict[str, Any] = {}  # model -> its app's deployment handle
        self._renewing: dict[str, Any] = {}  # version URI -> the task asking for its facts again

    # --- blocking parts (run in a thread) --------------------------------------------------------

    def serving(self, state: Any) -> dict[str, Any]:
        """Serve's applications of what the serve state ``state`` lists, and the metrics series
        kept so far (blocking calls; the series grow by ``refresh_metrics``)."""
        from ray import serve

        from kiln.serve.app import model_app_name

        errors: list[str] = []
        apps = serve.status().applications
        names = sorted({m["name"] for m in state.models})
        replicas = {}
        for name in names:
            app = apps.get(model_app_name(name))
            if app is None:
                replicas[name] = {"status": "NOT DEPLOYED", "replicas": {}}
                continue
            replicas[name] = {
                "status": str(getattr(app.status, "value", app.status)),
                "replicas": {
                    str(k): v for d in app.deployments.values() for k, v in d.replica_states.items()
                },
            }
        if self.metrics_error:
            errors.append(self.metrics_error)
        return {
            "state": state,
            "names": names,
            "apps": replicas,
            "series": self.metrics.series(),
            "errors": errors,
        }

    def refresh_metrics(self) -> bool:
        """Scrape the serving metrics once and keep the snapshot (blocking; Ray's exporter takes
        about half a second to answer, so the console's server calls this in the background,
        never while a page waits). Returns whether there was an endpoint to scrape."""
        from kiln.serve.instance import load_state

        state = load_state(self.run_dir)
        if state is None or not state.metrics_url:
            return False
        try:
            self.metrics.add(scrape(state.metrics_url))
            self.metrics_error = None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self.metrics_error = f"metrics {state.metrics_url}: {first_line(exc)}"
        return True

    def rollout(self, model: str) -> dict[str, Any] | None:
        """The rollout panel of ``model``, None when it never had a rollout (blocking)."""
        from kiln.rollout.control.api import rollout_history, rollout_status
        from kiln.rollout.core.store import RolloutStore

        if RolloutStore(self.run_dir, model).load() is None:
            return None
        status = rollout_status(self.run_dir, None, model).to_dict()
        return rollout_view(status, rollout_history(self.run_dir, model))

    def facts(self, tracking_uri: str | None, uri: str) -> dict[str, Any]:
        """Registry facts of a served version (blocking; {} when unknown), asked of the registry
        and kept: ``known_facts`` answers from what is kept."""
        from kiln.models.card import version_facts

        now = time.monotonic()
        try:
            found = version_facts(tracking_uri, uri) if tracking_uri else {}
            facts = {k: found[k] for k in FACT_KEYS if k in found}
        except KilnError as exc:
            facts = {"error": first_line(exc)}
        self._facts[uri] = (now, facts)
        return facts

    def known_facts(self, uri: str) -> tuple[dict[str, Any] | None, bool]:
        """(the facts kept for ``uri`` or None, whether they are older than FACTS_TTL_S): a page
        gets kept facts at once while newer ones are asked for in the background (aliases move
        on promotion; the rest of a registry version never changes)."""
        cached = self._facts.get(uri)
        if cached is None:
            return None, True
        return cached[1], time.monotonic() - cached[0] >= FACTS_TTL_S

    # --- the page's JSON -------------------------------------------------------------------------

    async def gather(self, actions: bool) -> dict[str, Any]:
        """The page's JSON: every served model with its versions, replicas, series, rollout and
        monitoring. ``actions``: whether the request may use the rollout buttons."""
        import asyncio

        from kiln.serve.instance import load_state

        started = time.perf_counter()
        state = await asyncio.to_thread(load_state, self.run_dir)
        if state is None:
            raise KilnError(f"nothing is served from {self.run_dir} (no serve state file)")
        names = sorted({m["name"] for m in state.models})
        errors: list[str] = []
        # Serve's status, and each model's rollout and monitor, asked at the same time
        serving, *panels = await asyncio.gather(
            asyncio.to_thread(self.serving, state),
            *(
                asyncio.gather(
                    asyncio.to_thread(self._rollout_or_error, name, errors),
                    self._monitor(name, errors),
                )
                for name in names
            ),
        )
        serving["errors"][:0] = errors
        models = []
        for name, (rollout, monitor) in zip(names, panels, strict=True):
            record = (rollout or {}).get("record") or {}
            listed = [m for m in state.models if m["name"] == name]
            uris = {m["version"]: m.get("uri", "") for m in listed}
            active = rollout is not None and rollout["active"]
            for version, key in (("stable", "stable_uri"), ("candidate", "candidate_uri")):
                # a finished rollout's candidate is no longer loaded: only what serves is listed
                if record.get(version) and record.get(key) and (version == "stable" or active):
                    uris.setdefault(record[version], record[key])
            default = record.get("stable") or next(
                (m["version"] for m in listed if m.get("default")), None
            )
            ordered = sorted(uris.items(), key=lambda kv: _version_order(kv[0]))
            known = await asyncio.gather(
                *(self._facts_now(state.tracking_uri, uri) for _, uri in ordered)
            )
            versions = []
            for (version, uri), facts in zip(ordered, known, strict=True):
                roles = [
                    role
                    for role, hit in (
                        ("default", version == default),
                        ("stable", version == record.get("stable")),
                        ("candidate", active and version == record.get("candidate")),
                    )
                    if hit
                ]
                points = serving["series"].get((name, version), [])
                versions.append(
                    {
                        "version": version,
                        "uri": uri,
                        "roles": roles,
                        "facts": facts,
                        "series": points,
                        "latest": points[-1] if points else None,
                        "monitor": self._monitor_version(name, version, monitor),
                    }
                )
            models.append(
                {
                    "name": name,
                    "app": serving["apps"].get(name, {}),
                    "versions": versions,
                    "rollout": rollout,
                    "monitor_scope": (monitor or {}).get("replica"),
                }
            )
        return {
            "time": time.time(),
            "url": state.url,
            "actions": actions,
            "models": models,
            "errors": serving["errors"],
            "gathered_ms": round(1000 * (time.perf_counter() - started), 1),
        }

    async def _facts_now(self, tracking_uri: str | None, uri: str) -> dict[str, Any]:
        """A version's facts: asked of the registry the first time, then the kept ones, renewed
        in the background once older than FACTS_TTL_S (a page never waits for the registry
        twice)."""
        import asyncio

        kept, stale = self.known_facts(uri)
        if kept is None:
            return await asyncio.to_thread(self.facts, tracking_uri, uri)
        if stale and uri not in self._renewing:
            task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self.facts, tracking_uri, uri)
            )
            self._renewing[uri] = task  # a strong reference until it ends
            task.add_done_callback(lambda _: self._renewing.pop(uri, None))
        return kept

    def _rollout_or_error(self, model: str, errors: list[str]) -> dict[str, Any] | None:
        try:
            return self.rollout(model)
        except KilnError as exc:
            errors.append(f"rollout of {model}: {first_line(exc)}")
            return None

    async def _monitor(self, model: str, errors: list[str]) -> dict[str, Any] | None:
        """One replica's monitor report of every version it serves (``kiln monitor status``)."""
        from ray import serve
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        from kiln.serve.app import model_app_name

        try:
            # one handle per model, kept: a new handle sets up its router on its first call
            handle = self._handles.get(model)
            if handle is None:
                handle = self._handles[model] = serve.get_app_handle(model_app_name(model))
            return await handle.monitor_status.remote()
        except (RayError, RayServeException) as exc:  # a replica's failure: shown, never fatal
            self._handles.pop(model, None)
            errors.append(f"monitor of {model}: {first_line(exc)}")
            return None

    def _monitor_version(
        self, model: str, version: str, report: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        """The version's monitor status, with its drift and OOD points over time (one point per
        evaluation this console saw)."""
        status = ((report or {}).get("versions") or {}).get(version)
        if status is None:
            return None
        if status.get("monitored") and status.get("evaluated_at"):
            points = self.monitor_points.setdefault((model, version), [])
            if not points or points[-1]["t"] != status["evaluated_at"]:
                points.append(
                    {
                        "t": status["evaluated_at"],
                        "drift": status["drift"].get("score"),
                        "ood_rate": status["ood"].get("window_rate"),
                    }
                )
                del points[:-MONITOR_POINTS]
        features = sorted(
            (status.get("drift") or {}).get("features", []),
            key=lambda f: (not f.get("drifted"), -(f.get("psi") or 0.0)),
        )
        retrain = status.get("retrain")
        return {
            **{k: v for k, v in status.items() if k not in ("drift", "retrain")},
            # the events only: the policy (project, overrides, Jobs address) stays off the page
            "retrain": None
            if retrain is None
            else {"in_flight": retrain.get("in_flight"), "events": retrain.get("events", [])},
            "drift": {
                **{k: v for k, v in (status.get("drift") or {}).items() if k != "features"},
                "top": features[:8],
            },
            "points": self.monitor_points.get((model, version), []),
        }


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 30, version)
