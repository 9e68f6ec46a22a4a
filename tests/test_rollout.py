"""Versioned rollouts against a real served app (`kiln serve start`), under bounded load on
127.0.0.1.

One app serves the digits model (served once per module). The registry holds two good versions
(``stable`` and ``good``: other weights), a faulty version (raises on a share of inputs) and a slow
one. Each test sets up the rollout state it needs (``idle``: no rollout in progress, the app
answering; ``stable_on``: a given version promoted) and works relative to whichever good version is
stable, so the tests pass alone and in any order. Waits are on observable state (the record's
phase and revision, audit log entries, HTTP answers), never on sleeps tied to internal periods.
Every test asserts zero failed client requests wherever the versions involved are good.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import last_json, run_kiln
from kiln.waiting import wait_until
from ray_actors import replica_pids
from served_models import CNN, DIGITS, digits_raw, free_port, train_and_register, uint8_infer_body

pytestmark = [pytest.mark.slow, pytest.mark.module_seconds(150)]
TESTS = Path(__file__).resolve().parent
MODEL = "digits"
CLIENTS = 4


@dataclass
class Versions:
    stable: str  # the version serving starts on (the config lists it alone)
    good: str
    faulty: str
    slow: str

    def other(self, version: str) -> str:
        """The good version that is not ``version``."""
        return self.good if version == self.stable else self.stable


@dataclass
class RolloutRegistry:
    run_dir: Path
    tracking_uri: str
    stable_uri: str


@pytest.fixture(scope="module", autouse=True)
def allow_test_builders():
    """The bad versions' architectures (tests/rollout_models.py) are allowed by the operator, as a
    custom builder must be: in this process (rollout checks) and, through it, in `kiln serve start`
    and its replicas."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KILN_ALLOWED_BUILDERS", "rollout_models")
        yield


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


def start_serving(served: dict) -> dict:
    """``kiln serve start`` with the module's arguments; returns its JSON line."""
    proc = run_kiln(*served["start_args"], env=served["env"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    return last_json(proc.stdout)


@pytest.fixture(scope="module")
def served(ray_cluster, registry, versions, serve_dir):
    """The app serving v1 only (later versions reach the replicas through rollouts)."""
    port = free_port()
    served = {
        "start_args": start_args(ray_cluster, registry, serve_dir, port),
        "env": {"MLFLOW_TRACKING_URI": registry.tracking_uri},
    }
    served.update(start_serving(served))
    yield served
    run_kiln("serve", "stop", "--address", ray_cluster, "--run-dir", str(serve_dir), timeout=300)


def answering(url: str) -> bool:
    """Whether the app answers the model's readiness endpoint."""
    try:
        return requests.get(f"{url}/v2/models/{MODEL}/ready", timeout=10).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture
def idle(served, serve_dir, versions) -> str:
    """The app answering (started again if a test stopped it) with no rollout in progress (one
    left running is rolled back), unversioned requests answered by the stable version. Returns the
    stable version."""
    from kiln.rollout.control.api import rollout_command
    from kiln.rollout.core.store import FINISHED

    if not answering(served["url"]):
        start_serving(served)
    record = load_record(serve_dir)
    if record is not None and record.active:
        rollout_command(serve_dir, None, MODEL, "rollback")
        record = wait_phase(serve_dir, *FINISHED)
    stable = record.stable if record is not None else versions.stable
    wait_routed(served["url"], stable, all_of=CLIENTS)
    return stable


@pytest.fixture
def stable_on(served, serve_dir, idle):
    """Make a given good version the stable one (a blue-green rollout promoted by hand), unless it
    is already; returns a function of the version."""
    from kiln.rollout.control.api import rollout_command
    from kiln.rollout.core.store import Phase

    def make(version: str) -> str:
        if idle == version:
            return version
        start(serve_dir, version, "blue-green", bake_s=600.0, interval_s=0.5)
        wait_phase(serve_dir, Phase.RUNNING)
        rollout_command(serve_dir, None, MODEL, "promote")
        wait_phase(serve_dir, Phase.PROMOTED)
        wait_routed(served["url"], version, all_of=CLIENTS)
        return version

    return make


# --- load ----------------------------------------------------------------------------------------

IMAGES = digits_raw(16)


def body(i: int) -> str:
    return uint8_infer_body(IMAGES[i % len(IMAGES)])


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
        """Until the ``limit`` requests are answered (the threads end), then stop."""
        for t in self._threads:
            t.join(timeout=timeout)
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


def load_record(serve_dir):
    from kiln.rollout.core.store import RolloutStore

    return RolloutStore(serve_dir, MODEL).load()


def wait_record(serve_dir, condition, what: str, timeout: float = 90.0):
    """The persisted record, once ``condition(record)`` holds (polled: the record is the state)."""
    return wait_until(
        lambda: (r := load_record(serve_dir)) is not None and condition(r) and r,
        timeout,
        f"the rollout record of '{MODEL}' to show {what}",
    )


def wait_phase(serve_dir, *phases: str, timeout: float = 90.0):
    return wait_record(serve_dir, lambda r: r.phase in phases, "/".join(phases), timeout)


def wait_weight(serve_dir, weight: float, timeout: float = 90.0):
    return wait_record(
        serve_dir, lambda r: r.phase == "running" and r.weight == weight, f"{weight}%", timeout
    )


def ask(url: str, i: int = 0) -> str | None:
    """The version that answers one unversioned infer request (None: it failed)."""
    resp = requests.post(f"{url}/v2/models/{MODEL}/infer", data=body(i), timeout=60)
    return resp.json().get("model_version") if resp.status_code == 200 else None


def wait_routed(url: str, version: str, all_of: int = 1, timeout: float = 60.0) -> None:
    """Until the replicas follow the routing table: ``all_of`` consecutive unversioned requests
    answered by ``version`` (1: until one is)."""
    run = [0]

    def routed() -> bool:
        run[0] = run[0] + 1 if ask(url, run[0]) == version else 0
        return run[0] >= all_of

    wait_until(routed, timeout, f"unversioned requests answered by v{version}", interval=0.05)


def wait_answers(load: Load, condition, what: str, timeout: float = 60.0) -> None:
    """Until ``condition(answers)`` holds for the answers a running load has collected."""
    wait_until(lambda: condition(list(load.answers)), timeout, what, interval=0.05)


def last_all(version: str, n: int = 20):
    """A condition on answers: the last ``n`` are all good answers by ``version``."""
    return lambda answers: (
        len(answers) >= n and all(a.status == 200 and a.version == version for a in answers[-n:])
    )


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


def test_bad_options_fail_with_one_line(served, ray_cluster, serve_dir, versions, idle):
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


def test_canary_share_sticky_header_and_manual_rollback(
    served, ray_cluster, serve_dir, versions, idle
):
    stable, target = idle, versions.other(idle)
    proc = run_kiln(
        "rollout",
        "start",
        MODEL,
        "--to",
        target,
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
    wait_routed(served["url"], target)  # the replica follows the new table
    answers = Load(served["url"], limit=1200).__enter__().wait()
    assert not failures(answers)
    shares = Counter(a.version for a in answers)
    assert set(shares) == {stable, target}
    assert abs(100.0 * shares[target] / len(answers) - 10.0) <= 3.0, shares

    sticky = Load(served["url"], limit=800, sticky_header="X-User", users=200).__enter__().wait()
    assert not failures(sticky)
    per_user: dict[str, set] = {}
    for a in sticky:
        per_user.setdefault(a.user, set()).add(a.version)
    assert all(len(v) == 1 for v in per_user.values()), {
        u: v for u, v in per_user.items() if len(v) > 1
    }
    users_on_new = sum(1 for v in per_user.values() if v == {target})
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
        wait_answers(load, lambda answers: len(answers) >= 20, "20 answers before the rollback")
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
        wait_answers(load, last_all(stable), f"the last 20 answers from v{stable}")
    answers = load.answers
    assert len(answers) > 50 and not failures(answers)
    last = since_start(serve_dir)[-1]
    assert last["decision"] == "rollback" and last["trigger"] == "user"


def test_linear_ramp_up_promotes_with_zero_failures(served, registry, serve_dir, versions, idle):
    target = versions.other(idle)
    with Load(served["url"]) as load:
        start(
            serve_dir,
            target,
            "linear",
            steps=[25.0, 50.0, 100.0],
            bake_s=1.5,
            interval_s=0.5,
            gates=["error_rate<0.01", "p99_ms<5000"],
        )
        record = wait_phase(serve_dir, "promoted", "rolled_back")
        assert record.phase == "promoted", record.reason
        wait_answers(load, last_all(target), f"the last 20 answers from v{target}")
    answers = load.answers
    assert len(answers) > 100 and not failures(answers)
    assert champion(registry) == target
    decisions = [
        (e["decision"], e["weights"].get(target))
        for e in since_start(serve_dir)
        if e["decision"] in ("step", "advance", "promote")
    ]
    assert decisions[:3] == [("step", 25.0), ("advance", 50.0), ("advance", 100.0)]
    assert decisions[-1][0] == "promote" and since_start(serve_dir)[-1]["trigger"] == "auto"


def test_restarted_app_comes_back_on_the_promoted_version(
    served, ray_cluster, serve_dir, versions, stable_on
):
    stable_on(versions.good)  # a promoted version the config (v1 only) does not list
    proc = run_kiln(
        "serve", "stop", "--address", ray_cluster, "--run-dir", str(serve_dir), timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    info = start_serving(served)  # the same config: it lists v1 only
    assert [(m["version"], m["default"]) for m in info["models"]] == [
        (versions.stable, False),
        (versions.good, True),
    ]
    answers = Load(served["url"], limit=40).__enter__().wait()
    assert not failures(answers) and {a.version for a in answers} == {versions.good}


def test_blue_green_switch_and_rollback_of_the_promotion(
    served, ray_cluster, registry, serve_dir, versions, idle
):
    stable, target = idle, versions.other(idle)
    with Load(served["url"]) as load:
        start(serve_dir, target, "blue-green", bake_s=2.0, interval_s=0.5)
        wait_weight(serve_dir, 100.0)
        wait_answers(load, last_all(target, CLIENTS), f"answers from v{target}")
        switched_at = len(load.answers)
        record = wait_phase(serve_dir, "promoted", "rolled_back")
        assert record.phase == "promoted", record.reason
        assert champion(registry) == target
        wait_answers(load, lambda a: len(a) >= switched_at + 20, "20 answers after the switch")
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
        wait_answers(load, last_all(stable), f"the last 20 answers from v{stable} again")
    answers = load.answers
    assert not failures(answers)
    assert {a.version for a in answers[switched_at : switched_at + 20]} == {target}  # all at once
    assert champion(registry) == stable
    last = since_start(serve_dir)[-1]
    assert (last["decision"], last["trigger"], last["weights"]) == (
        "rollback",
        "user",
        {stable: 100.0},
    )


@pytest.mark.parametrize(
    "bad, gate, signal",
    [("faulty", "error_rate<0.05", "error_rate"), ("slow", "p99_ms<150", "p99_ms")],
)
def test_bad_version_is_rolled_back_by_its_gate(
    served, serve_dir, versions, idle, bad, gate, signal
):
    stable = idle
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
        wait_answers(load, last_all(stable), f"the last 20 answers from v{stable} again")
    assert record.phase == "rolled_back"
    entries = since_start(serve_dir)
    assert entries[0]["trigger"] == "monitor"
    step = next(i for i, e in enumerate(entries) if e["decision"] == "step")
    rollback = next(i for i, e in enumerate(entries) if e["decision"] == "rollback")
    # gate evaluations that saw the candidate's traffic, from the step's start to the rollback
    # ("hold": an interval without it, as when a loaded machine starves the candidate's process;
    # a full run saw five in a row while another test trained a model)
    evaluations = [e for e in entries[step + 1 : rollback + 1] if e["decision"] != "hold"]
    assert 1 <= len(evaluations) <= 2, [
        (e["decision"], e["metrics"].get(getattr(versions, bad))) for e in evaluations
    ]
    why = entries[rollback]
    assert why["trigger"] == "gate" and why["reason"].startswith(f"{gate} failed")
    assert why["gates"][gate]["ok"] is False
    assert why["weights"] == {stable: 100.0}


def test_shadow_traffic_never_changes_a_response(served, serve_dir, versions, idle):
    from kiln.rollout.control.api import rollout_command, rollout_status

    stable = idle
    direct = {}
    for i in range(len(IMAGES)):
        resp = requests.post(
            f"{served['url']}/v2/models/{MODEL}/versions/{stable}/infer",
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

    def mirrored() -> list[dict]:  # the candidate's metrics of each gate evaluation so far
        entries = [e["metrics"].get(versions.faulty) for e in since_start(serve_dir)]
        return [m for m in entries if m]

    # The controller sums each interval's reports: wait for evaluations that saw mirrored errors.
    wait_until(
        lambda: sum(m["errors"] for m in mirrored()) > 0 and sum(m["compared"] for m in mirrored()),
        60,
        "gate evaluations with the mirrored requests",
    )
    status = rollout_status(serve_dir, None, MODEL)
    rollout_command(serve_dir, None, MODEL, "rollback")
    assert not failures(answers) and {a.version for a in answers} == {stable}
    # Same answers as the stable version alone (dynamic batching may change the last float bits).
    assert all(np.allclose(a.probabilities, direct[a.image], rtol=0, atol=1e-5) for a in answers)
    assert sum(m["requests"] for m in mirrored()) > 0
    assert status.live and status.record["shadow"] == 100.0


def test_rollout_goes_on_after_the_router_replica_and_controller_die(
    served, serve_dir, versions, idle, ray_cluster
):
    """SIGKILL of the replica (by the pid Ray reports) and of the controller mid-bake: the rollout
    promotes, each kill is in the audit log with its cause, the restarted controller's bake time
    goes on from the record, and the killed replica's requests in flight are in the candidate's
    gated errors."""
    import os
    import signal

    import ray

    from kiln.rollout.core.actors import NAMESPACE, controller_name

    target = versions.other(idle)

    def replicas() -> dict[str, int]:  # the model's Serve replica actors: name -> pid
        return replica_pids(ray_cluster, "kiln-digits#")

    with Load(served["url"]) as load:
        start(
            serve_dir,
            target,
            "linear",
            steps=[20.0, 60.0, 100.0],
            bake_s=5.0,  # the kills below land inside step 0's bake
            interval_s=0.5,
            # The killed replica's requests in flight count as errors of their versions, in the
            # interval in which the controller finds the death; with one replica nothing else
            # answers then, so an error-rate gate sees 1.0 whenever one of them was the
            # candidate's (a rollback in one full run). The gate here counts the death once
            # (restarts); the lost requests are checked in the metrics below, and gates that roll
            # back on them in test_rollout_units.
            gates=["restarts<5"],
        )
        baked = wait_record(
            serve_dir, lambda r: r.weight == 20.0 and r.baked_s > 0, "a step part-baked"
        ).baked_s
        victim, pid = next(iter(replicas().items()))
        os.kill(pid, signal.SIGKILL)  # a replica this module's serving started
        ray.kill(ray.get_actor(controller_name(MODEL), namespace=NAMESPACE), no_restart=False)
        record = wait_phase(serve_dir, "promoted", "rolled_back", timeout=150)
        assert record.phase == "promoted", record.reason
        wait_routed(served["url"], target, all_of=CLIENTS)  # the restarted replica has the table
        answers = load.stop()
    assert replicas() and victim not in replicas()
    entries = since_start(serve_dir)
    faults = {e["decision"]: e for e in entries if e["trigger"] == "fault"}
    decisions = [
        e["decision"]
        for e in entries
        if e["decision"] not in ("continue", "hold") and e["trigger"] != "fault"
    ]
    assert decisions == ["start", "step", "advance", "advance", "promote"]  # each step once
    assert set(faults) == {"restart", "replica_lost"}, faults
    assert faults["restart"]["baked_s"] >= baked  # the bake goes on from the record
    assert "WORKER_DIED" in faults["replica_lost"]["cause"]
    # what the replica had in flight of the candidate is in the candidate's gated errors
    lost = sum(  # one gate entry per interval carries that interval's metrics
        e["metrics"].get(target, {}).get("lost", 0) for e in entries if e["trigger"] != "fault"
    )
    assert lost == faults["replica_lost"]["in_flight"].get(target, 0)
    # one replica serves here: while Serve replaces it, no other can answer, and what fails is the
    # ingress's JSON 503 or, for a request whose retry found no replica either, a closed
    # connection (status 0; seen 4 x 503 in one run, 3 x closed in another); never Serve's
    # plain-text 500 (tests/test_serve_faults.py: with two replicas, nothing fails)
    assert {a.status for a in failures(answers)} <= {0, 503}, Counter(a.status for a in answers)


def test_requests_pinned_to_a_live_canary_never_decide_it(served, serve_dir, versions, idle):
    """Live, against the served canary of the faulty version: requests pinned to the candidate,
    failing ones (which would fail its error-rate gate at once) and good ones (which would bake
    its one step in two intervals and promote it), neither roll it back nor promote it. With no
    traffic routed to it, every interval holds for want of gated data, while the rollout's status
    shows the pinned requests counted apart."""
    from kiln.rollout.control.api import rollout_status

    candidate, gate = versions.faulty, "error_rate<0.05"
    start(serve_dir, candidate, "canary", weight=10.0, bake_s=1.0, interval_s=0.5, gates=[gate])
    wait_phase(serve_dir, "running")
    answered: Counter[int] = Counter()
    counted: list[dict] = []  # the controller's per-interval metrics of the candidate
    stop = threading.Event()

    def pin() -> None:  # digits: the faulty version fails the brighter ones, answers the rest
        with requests.Session() as session:
            i = 0
            while not stop.is_set():
                url = f"{served['url']}/v2/models/{MODEL}/versions/{candidate}/infer"
                answered[session.post(url, data=body(i), timeout=60).status_code] += 1
                i += 1

    def seen() -> bool:
        metrics = rollout_status(serve_dir, None, MODEL).metrics.get(candidate) or {}
        if metrics.get("pinned") and (not counted or counted[-1] != metrics):
            counted.append(metrics)
        failed = sum(n for code, n in answered.items() if code >= 500)
        return len(counted) >= 4 and answered[200] > 0 and failed > 0

    thread = threading.Thread(target=pin, daemon=True)
    thread.start()
    try:
        wait_until(seen, 120, "intervals counting requests pinned to the candidate", interval=0.2)
    finally:
        stop.set()
        thread.join(timeout=60)
    record = load_record(serve_dir)
    assert (record.phase, record.step, record.weight, record.baked_s) == (
        "running",
        0,
        10.0,
        0.0,
    )
    assert all(m["requests"] == 0 and m["error_rate"] is None for m in counted), counted
    entries = since_start(serve_dir)
    decisions = Counter(e["decision"] for e in entries)
    assert not {"rollback", "promote", "continue", "advance"} & set(decisions), decisions
    holds = [e for e in entries if e["decision"] == "hold"]
    assert len(holds) >= 4 and all(e["reason"] == f"no data for {gate}" for e in holds)
