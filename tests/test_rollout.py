"""Versioned rollouts against a real served app (`kiln serve start`), under bounded load on
127.0.0.1.

One app serves the digits model, v1 stable. The registry holds a good v2 (other weights), a faulty
version (raises on a share of inputs) and a slow one. The tests run in order, each from the state
the previous one left: canary share + sticky header + manual rollback, linear ramp-up to a
promotion, a restart coming back on the promoted version, blue-green + rollback of the promotion,
the bad versions rolled back by gates, shadow, and a rollout surviving the death of the replica and
the controller. Every test asserts zero failed client requests wherever the versions involved are
good.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import PLATFORM, last_json, run_kiln
from served_models import CNN, DIGITS, digits_raw, free_port, train_and_register

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
MODEL = "digits"
CLIENTS = 4


@pytest.fixture(scope="module", autouse=True)
def model_factories_importable():
    """Replicas import the bad versions' factories (tests/rollout_models.py): put tests/ on the path
    of the Ray workers this module's Ray instance starts (they inherit the environment)."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), str(PLATFORM), old) if p)
    yield
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


@dataclass
class Versions:
    stable: str
    good: str
    faulty: str
    slow: str


@dataclass
class RolloutRegistry:
    run_dir: Path
    tracking_uri: str
    stable_uri: str


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> RolloutRegistry:
    """This module's own MLflow store: its extra versions and alias moves must not change the
    version numbers other modules expect in the shared one (served_models.registry)."""
    from kiln import tracking as trk

    run_dir = tmp_path_factory.mktemp("rollout-registry")
    v1 = train_and_register(run_dir, "digits", DIGITS, CNN, epochs=2, seed=0)
    return RolloutRegistry(run_dir, trk.default_tracking_uri(run_dir), v1)


@pytest.fixture(scope="module")
def versions(registry) -> Versions:
    from rollout_models import register_variant

    v1 = registry.stable_uri
    v2 = train_and_register(registry.run_dir, "digits", DIGITS, CNN, epochs=2, seed=1)
    faulty = register_variant(
        registry.tracking_uri, registry.run_dir, v1, "rollout_models:faulty_cnn"
    )
    slow = register_variant(registry.tracking_uri, registry.run_dir, v1, "rollout_models:slow_cnn")
    number = lambda uri: uri.rsplit("/", 1)[1]  # noqa: E731
    return Versions(number(v1), number(v2), number(faulty), number(slow))


@pytest.fixture(scope="module")
def serve_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rollout-serving")


def start_args(ray_cluster, registry, serve_dir, port):
    return [
        "serve",
        "start",
        registry.stable_uri,
        "serve.deployment.num_cpus=0.5",
        "--port",
        str(port),
        "--address",
        ray_cluster,
        "--run-dir",
        str(serve_dir),
        "--json",
    ]


@pytest.fixture(scope="module")
def served(ray_cluster, registry, versions, serve_dir):
    """The app serving v1 only (later versions reach the replicas through rollouts)."""
    port = free_port()
    env = {"MLFLOW_TRACKING_URI": registry.tracking_uri}
    proc = run_kiln(*start_args(ray_cluster, registry, serve_dir, port), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = last_json(proc.stdout)
    info["start_args"] = start_args(ray_cluster, registry, serve_dir, port)
    yield info
    run_kiln("serve", "stop", "--address", ray_cluster, "--run-dir", str(serve_dir), timeout=300)


# --- load ----------------------------------------------------------------------------------------

IMAGES = digits_raw(16)


def body(i: int) -> str:
    img = IMAGES[i % len(IMAGES)]
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "UINT8",
                    "shape": [1, *img.shape],
                    "data": img.ravel().tolist(),
                }
            ]
        }
    )


@dataclass
class Answer:
    image: int
    status: int
    version: str | None
    probabilities: list[float] | None
    user: str | None


@dataclass
class Load:
    """CLIENTS threads posting unversioned infer requests until stopped (or ``limit`` requests)."""

    url: str
    limit: int | None = None
    sticky_header: str | None = None
    users: int = 200
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self._count = 0
        self._threads = [
            threading.Thread(target=self._client, args=(c,), daemon=True) for c in range(CLIENTS)
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> list[Answer]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        return self.answers

    def wait(self, timeout: float = 120.0) -> list[Answer]:
        deadline = time.monotonic() + timeout
        while any(t.is_alive() for t in self._threads) and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.stop()

    def _next(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or (self.limit is not None and self._count >= self.limit):
                return None
            self._count += 1
            return self._count

    def _client(self, client: int) -> None:
        session = requests.Session()
        while (i := self._next()) is not None:
            user = f"user-{i % self.users}" if self.sticky_header else None
            headers = {
                "Content-Type": "application/json",
                **({self.sticky_header: user} if user else {}),
            }
            try:
                resp = session.post(
                    f"{self.url}/v2/models/{MODEL}/infer", data=body(i), headers=headers, timeout=60
                )
                payload = resp.json() if resp.status_code == 200 else {}
            except requests.RequestException:
                resp, payload = None, {}
            probs = next(
                (o["data"] for o in payload.get("outputs", []) if o["name"] == "probabilities"),
                None,
            )
            with self._lock:
                self.answers.append(
                    Answer(
                        i % len(IMAGES),
                        resp.status_code if resp is not None else 0,
                        payload.get("model_version"),
                        probs,
                        user,
                    )
                )


def failures(answers: list[Answer]) -> list[Answer]:
    return [a for a in answers if a.status != 200]


# --- helpers -------------------------------------------------------------------------------------


def start(serve_dir, to: str, strategy: str, trigger: str = "user", **options):
    from kiln.rollout.control.api import start_rollout
    from kiln.rollout.core.spec import RolloutOptions

    return start_rollout(
        serve_dir, None, MODEL, to, strategy, RolloutOptions(**options), trigger=trigger
    )


def wait_phase(serve_dir, *phases: str, timeout: float = 90.0):
    from kiln.rollout.control.api import wait_for

    return wait_for(serve_dir, MODEL, phases, timeout)


def wait_weight(serve_dir, weight: float, timeout: float = 90.0):
    from kiln.rollout.core.store import RolloutStore

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = RolloutStore(serve_dir, MODEL).load()
        if record.phase == "running" and record.weight == weight:
            time.sleep(1.5)  # every replica fetches the new table within its report period (0.5 s)
            return record
        time.sleep(0.1)
    raise AssertionError(f"the rollout did not reach {weight}% (record: {record})")


def history(serve_dir) -> list[dict]:
    from kiln.rollout.control.api import rollout_history

    return rollout_history(serve_dir, MODEL)


def since_start(serve_dir) -> list[dict]:
    entries = history(serve_dir)
    last = max(i for i, e in enumerate(entries) if e["decision"] == "start")
    return entries[last:]


def champion(registry) -> str:
    from kiln import tracking as trk

    return str(trk.model_version_for(registry.tracking_uri, f"models:/{MODEL}@champion").version)


# --- tests ---------------------------------------------------------------------------------------


def test_bad_options_fail_with_one_line(served, ray_cluster, serve_dir, versions):
    cases = [
        (
            ["--strategy", "canary", "--gate", "error_rate<<1"],
            "error: gate 'error_rate<<1' is not NAME<VALUE",
        ),
        (
            ["--strategy", "linear", "--steps", "50,10"],
            "error: --steps must be increasing percentages",
        ),
        (
            ["--strategy", "canary", "--gate", "agreement>0.9"],
            "error: an 'agreement' gate needs mirrored",
        ),
        (["--strategy", "canary", "--bake", "soon"], "error: --bake 'soon' is not a duration"),
    ]
    for extra, message in cases:
        proc = run_kiln(
            "rollout",
            "start",
            MODEL,
            "--to",
            versions.good,
            *extra,
            "--run-dir",
            str(serve_dir),
            "--address",
            ray_cluster,
        )
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(message), (
            proc.stderr
        )
        assert "Traceback" not in proc.stderr
    proc = run_kiln(
        "rollout",
        "start",
        MODEL,
        "--to",
        "999",
        "--strategy",
        "canary",
        "--run-dir",
        str(serve_dir),
        "--address",
        ray_cluster,
    )
    assert proc.returncode == 2 and "error: unknown model 'models:/digits/999'" in proc.stderr, (
        proc.stderr
    )


def test_canary_share_sticky_header_and_manual_rollback(served, ray_cluster, serve_dir, versions):
    proc = run_kiln(
        "rollout",
        "start",
        MODEL,
        "--to",
        versions.good,
        "--strategy",
        "canary",
        "--weight",
        "10",
        "--bake",
        "10m",
        "--interval",
        "1s",
        "--sticky-header",
        "X-User",
        "--run-dir",
        str(serve_dir),
        "--address",
        ray_cluster,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    assert last_json(proc.stdout)["steps"] == [10.0]
    wait_weight(serve_dir, 10.0)
    answers = Load(served["url"], limit=1200).__enter__().wait()
    assert not failures(answers)
    shares = Counter(a.version for a in answers)
    assert set(shares) == {versions.stable, versions.good}
    assert abs(100.0 * shares[versions.good] / len(answers) - 10.0) <= 3.0, shares

    sticky = Load(served["url"], limit=800, sticky_header="X-User", users=200).__enter__().wait()
    assert not failures(sticky)
    per_user: dict[str, set] = {}
    for a in sticky:
        per_user.setdefault(a.user, set()).add(a.version)
    assert all(len(v) == 1 for v in per_user.values()), {
        u: v for u, v in per_user.items() if len(v) > 1
    }
    users_on_new = sum(1 for v in per_user.values() if v == {versions.good})
    assert 0 < users_on_new < 60  # about 10% of 200 users: a bucket per user, not per request

    status = run_kiln(
        "rollout", "status", MODEL, "--run-dir", str(serve_dir), "--address", ray_cluster, "--json"
    )
    assert status.returncode == 0, status.stderr
    live = last_json(status.stdout)
    assert (
        live["live"]
        and live["record"]["weight"] == 10.0
        and live["gates"]["error_rate<0.01"]["ok"] is not False
    )

    with Load(served["url"]) as load:  # manual rollback under continuous load
        time.sleep(1.0)
        proc = run_kiln(
            "rollout",
            "rollback",
            MODEL,
            "--run-dir",
            str(serve_dir),
            "--address",
            ray_cluster,
            "--json",
        )
        assert proc.returncode == 0, proc.stderr
        assert last_json(proc.stdout)["phase"] == "rolled_back"
        time.sleep(2.0)
    answers = load.answers
    assert len(answers) > 50 and not failures(answers)
    assert {a.version for a in answers[-20:]} == {versions.stable}
    assert (
        since_start(serve_dir)[-1]["decision"] == "rollback"
        and since_start(serve_dir)[-1]["trigger"] == "user"
    )


def test_linear_ramp_up_promotes_with_zero_failures(served, registry, serve_dir, versions):
    with Load(served["url"]) as load:
        start(
            serve_dir,
            versions.good,
            "linear",
            steps=[25.0, 50.0, 100.0],
            bake_s=1.5,
            interval_s=0.5,
            gates=["error_rate<0.01", "p99_ms<5000"],
        )
        record = wait_phase(serve_dir, "promoted", "rolled_back")
        time.sleep(1.5)
    assert record.phase == "promoted", record.reason
    answers = load.answers
    assert len(answers) > 100 and not failures(answers)
    assert {a.version for a in answers[-20:]} == {versions.good}
    assert champion(registry) == versions.good
    decisions = [
        (e["decision"], e["weights"].get(versions.good))
        for e in since_start(serve_dir)
        if e["decision"] in ("step", "advance", "promote")
    ]
    assert decisions[:3] == [("step", 25.0), ("advance", 50.0), ("advance", 100.0)]
    assert decisions[-1][0] == "promote" and since_start(serve_dir)[-1]["trigger"] == "auto"


def test_restarted_app_comes_back_on_the_promoted_version(
    served, ray_cluster, registry, serve_dir, versions
):
    proc = run_kiln(
        "serve", "stop", "--address", ray_cluster, "--run-dir", str(serve_dir), timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    proc = run_kiln(
        *served["start_args"], env={"MLFLOW_TRACKING_URI": registry.tracking_uri}, timeout=300
    )
    assert proc.returncode == 0, proc.stderr  # the same config: it lists v1 only
    info = last_json(proc.stdout)
    assert [(m["version"], m["default"]) for m in info["models"]] == [
        (versions.stable, False),
        (versions.good, True),
    ]
    answers = Load(served["url"], limit=40).__enter__().wait()
    assert not failures(answers) and {a.version for a in answers} == {versions.good}


def test_blue_green_switch_and_rollback_of_the_promotion(
    served, ray_cluster, registry, serve_dir, versions
):
    with Load(served["url"]) as load:
        start(serve_dir, versions.stable, "blue-green", bake_s=2.0, interval_s=0.5)
        wait_weight(serve_dir, 100.0)
        switched_at = len(load.answers)
        record = wait_phase(serve_dir, "promoted", "rolled_back")
        assert record.phase == "promoted", record.reason
        assert champion(registry) == versions.stable
        time.sleep(1.0)
        proc = run_kiln(
            "rollout",
            "rollback",
            MODEL,
            "--run-dir",
            str(serve_dir),
            "--address",
            ray_cluster,
            "--json",
        )
        assert proc.returncode == 0, proc.stderr
        time.sleep(2.0)
    answers = load.answers
    assert not failures(answers)
    assert {a.version for a in answers[switched_at : switched_at + 20]} == {
        versions.stable
    }  # all at once
    assert {a.version for a in answers[-20:]} == {versions.good}
    assert champion(registry) == versions.good
    last = since_start(serve_dir)[-1]
    assert (last["decision"], last["trigger"], last["weights"]) == (
        "rollback",
        "user",
        {versions.good: 100.0},
    )


@pytest.mark.parametrize(
    "bad, gate, signal",
    [("faulty", "error_rate<0.05", "error_rate"), ("slow", "p99_ms<150", "p99_ms")],
)
def test_bad_version_is_rolled_back_by_its_gate(served, serve_dir, versions, bad, gate, signal):
    with Load(served["url"]) as load:
        start(
            serve_dir,
            getattr(versions, bad),
            "canary",
            weight=30.0,
            bake_s=60.0,
            interval_s=1.0,
            gates=[gate],
            trigger="monitor",
        )
        record = wait_phase(serve_dir, "rolled_back", "promoted", timeout=120)
        time.sleep(1.5)
    assert record.phase == "rolled_back"
    entries = since_start(serve_dir)
    assert entries[0]["trigger"] == "monitor"
    step = next(i for i, e in enumerate(entries) if e["decision"] == "step")
    rollback = next(i for i, e in enumerate(entries) if e["decision"] == "rollback")
    evaluations = entries[
        step + 1 : rollback + 1
    ]  # gate evaluations from the step's start to the rollback
    assert 1 <= len(evaluations) <= 2, [e["decision"] for e in evaluations]
    why = entries[rollback]
    assert why["trigger"] == "gate" and why["reason"].startswith(f"{gate} failed")
    assert why["gates"][gate]["ok"] is False
    assert why["weights"] == {versions.good: 100.0}
    tail = load.answers[-20:]
    assert not failures(tail) and {a.version for a in tail} == {versions.good}


def test_shadow_traffic_never_changes_a_response(served, serve_dir, versions):
    from kiln.rollout.control.api import rollout_command, rollout_status

    direct = {}
    for i in range(len(IMAGES)):
        resp = requests.post(
            f"{served['url']}/v2/models/{MODEL}/versions/{versions.good}/infer",
            data=body(i),
            timeout=60,
        )
        direct[i] = next(o["data"] for o in resp.json()["outputs"] if o["name"] == "probabilities")
    # Mirror everything to the version that fails on a share of inputs: clients must not notice.
    start(
        serve_dir,
        versions.faulty,
        "shadow",
        weight=100.0,
        bake_s=600.0,
        interval_s=1.0,
        gates=["error_rate<2"],
    )
    wait_weight(serve_dir, 0.0)
    answers = Load(served["url"], limit=300).__enter__().wait()
    time.sleep(2.5)  # the controller sums a full interval
    status = rollout_status(serve_dir, None, MODEL)
    rollout_command(serve_dir, None, MODEL, "rollback")
    assert not failures(answers) and {a.version for a in answers} == {versions.good}
    # Same answers as the stable version alone (dynamic batching may change the last float bits).
    assert all(np.allclose(a.probabilities, direct[a.image], rtol=0, atol=1e-5) for a in answers)
    mirrored = [
        e["metrics"].get(versions.faulty)
        for e in since_start(serve_dir)
        if e["decision"] == "continue"
    ]
    mirrored = [m for m in mirrored if m]
    assert sum(m["requests"] for m in mirrored) > 0 and sum(m["errors"] for m in mirrored) > 0
    assert sum(m["compared"] for m in mirrored) > 0
    assert status.live and status.record["shadow"] == 100.0


def test_rollout_goes_on_after_the_router_replica_and_controller_die(served, serve_dir, versions):
    import ray

    from kiln.rollout.control.controller import NAMESPACE, controller_name

    def replicas() -> list[str]:  # the model's Serve replica actors (named in Serve's namespace)
        return [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::kiln-digits#")
        ]

    with Load(served["url"]):  # gates need traffic; requests in flight in the killed replica fail
        start(
            serve_dir,
            versions.stable,
            "linear",
            steps=[20.0, 60.0, 100.0],
            bake_s=3.0,
            interval_s=0.5,
        )
        wait_weight(serve_dir, 20.0)
        victim = replicas()[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        ray.kill(ray.get_actor(controller_name(MODEL), namespace=NAMESPACE), no_restart=False)
        record = wait_phase(serve_dir, "promoted", "rolled_back", timeout=150)
    assert record.phase == "promoted", record.reason
    assert replicas() and victim not in replicas()
    decisions = [
        e["decision"] for e in since_start(serve_dir) if e["decision"] not in ("continue", "hold")
    ]
    assert decisions == [
        "start",
        "step",
        "advance",
        "advance",
        "promote",
    ]  # one rollout, each step once
    answers = Load(served["url"], limit=40).__enter__().wait()
    assert not failures(answers) and {a.version for a in answers} == {versions.stable}
