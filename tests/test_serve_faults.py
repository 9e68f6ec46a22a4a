"""A replica's death under load, on the default ingress (HAProxy), against a real served app.

One app serves the digits model with 2 replicas on the session's Ray instance. Four clients post
unversioned infer requests while a fifth polls ``/v2/health/ready``; the test SIGKILLs one replica
by the process id Ray reports for it (a process this test's serving started). The ingress retries
the requests the replica dropped on the other replica: every request is answered 200, and the
server stays ready. With both replicas killed, what fails is
Kiln's JSON 503 with ``Retry-After``, never Serve's plain-text 500.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from conftest import last_json, run_kiln
from kiln.serve.ingress_stats import model_counters
from kiln.serve.instance import load_state
from kiln.waiting import wait_until
from ray_actors import replica_pids as app_replica_pids
from served_models import InferLoad, digits_raw, uint8_infer_body

pytestmark = [
    pytest.mark.slow,
    pytest.mark.module_seconds(20),
]  # starts an app of 2 replicas and waits for Serve to replace one
MODEL = "digits"
APP = f"kiln-{MODEL}"
CLIENTS = 4
IMAGES = digits_raw(8)


def infer_body(i: int) -> str:
    return uint8_infer_body(IMAGES[i % len(IMAGES)])


@dataclass
class Traffic(InferLoad):
    """The infer load (InferLoad) and one more thread polling readiness, until stopped."""

    ready: list[int] = field(default_factory=list)
    not_ready: list[str] = field(default_factory=list)  # the bodies of answers other than 200

    def threads(self) -> list[threading.Thread]:
        return [*super().threads(), threading.Thread(target=self._prober, daemon=True)]

    def _prober(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            try:
                resp = session.get(f"{self.url}/v2/health/ready", timeout=30)
                status, text = resp.status_code, resp.text[:300]
            except requests.RequestException as exc:
                status, text = 0, type(exc).__name__
            if status != 200:
                self.not_ready.append(text)
            self.ready.append(status)
            self._stop.wait(0.1)


def replica_pids(address: str) -> dict[str, int]:
    """The model's live Serve replicas: actor name -> process id (as Ray reports them)."""
    return app_replica_pids(address, f"{APP}#")


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return 0
    return sum(
        n
        for d in app.deployments.values()
        for state, n in d.replica_states.items()
        if getattr(state, "value", state) == "RUNNING"
    )


def kill(pid: int) -> None:
    """SIGKILL a replica process this test's serving started (checked: a Ray worker of ours)."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert f"ServeReplica:{APP}" in cmdline, cmdline
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def served(ray_cluster, registry, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("faults-serving")
    env = {"MLFLOW_TRACKING_URI": registry.tracking_uri}
    proc = run_kiln(
        "serve",
        "start",
        registry.uris["fp32-cnn"],
        "--port",
        "0",  # Kiln picks it (and picks again if it is taken before Serve binds it)
        "serve.deployment.replicas=2",
        "serve.deployment.num_cpus=0.25",
        "--address",
        ray_cluster,
        "--run-dir",
        str(run_dir),
        "--json",
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    yield {**last_json(proc.stdout), "run_dir": run_dir}
    run_kiln("serve", "stop", "--address", ray_cluster, "--run-dir", str(run_dir), timeout=300)


def test_a_replica_killed_under_load_fails_at_most_its_requests_in_flight_and_stays_ready(
    served, ray_cluster
):
    url = served["url"]
    wait_until(lambda: len(replica_pids(ray_cluster)) == 2, 60, "both replicas to be listed")
    with Traffic(url, MODEL, IMAGES, CLIENTS) as traffic:
        wait_until(lambda: len(traffic.answers) >= 40, 60, "40 answers before the kill")
        # ready before the kill (seen once, right after start: 503 for about 2 s; cause not found)
        wait_until(lambda: traffic.ready[-1:] == [200], 60, "the server to be ready")
        ready_at = len(traffic.ready) - 1
        victim_name, victim = next(iter(replica_pids(ray_cluster).items()))
        kill(victim)
        killed_at = len(traffic.answers)
        # until Serve has started a replacement and it runs (the window in which Serve reports the
        # app as not RUNNING), and then some more traffic on both replicas
        wait_until(
            lambda: (
                len(pids := replica_pids(ray_cluster)) == 2
                and victim_name not in pids
                and running_replicas() == 2
            ),
            120,
            "Serve to replace the killed replica",
            interval=0.5,
        )
        settled = len(traffic.answers)
        wait_until(lambda: len(traffic.answers) >= settled + 40, 60, "40 answers after it")
    failed = [a for a in traffic.answers if a[0] != 200]
    # The one failure no ingress can replay: an answer cut after its headers (the replica died
    # between writing its headers and its body, two writes; seen in about 1 full run in 8 at high
    # load). README, "When a replica dies". At most the requests in flight at the kill.
    cut = [a for a in failed if a == (0, "ChunkedEncodingError")]
    # the ingress's own counters of the model are readable (a rollout's retry-storm watch reads
    # them); HAProxy reloaded since the kill, so they count from its last reload
    counters = model_counters(load_state(served["run_dir"]).haproxy_dir, MODEL)
    assert counters is not None and counters.requests > 0, counters
    print(  # the figures BENCHMARKS.md (Faults) quotes; shown with pytest -s
        f"replica SIGKILL under load: {len(traffic.answers)} requests ({killed_at} before the "
        f"kill), {len(failed)} not 200 ({len(cut)} cut mid-answer); "
        f"ready polled {len(traffic.ready)} times, "
        f"{sum(1 for r in traffic.ready if r != 200)} not 200 ({traffic.not_ready[:1]})"
    )
    assert len(traffic.answers) > killed_at + 40
    # every other request answered 200: those in flight on the dead replica with no answer started
    # are replayed on the other one (before kiln.compat.retry_requests_a_dead_replica_held, HAProxy
    # closed the connection of a request it had not buffered whole: about half of the runs)
    assert [a for a in failed if a not in cut] == [], failed[:5]
    assert len(cut) <= CLIENTS, cut
    after = traffic.ready[ready_at:]
    assert after and set(after) == {200}, (sorted(set(after)), traffic.not_ready[:3])


def test_with_every_replica_dead_a_request_gets_kilns_json_503_not_plain_text(served, ray_cluster):
    url = served["url"]
    wait_until(lambda: running_replicas() == 2, 120, "both replicas running")
    for pid in replica_pids(ray_cluster).values():
        kill(pid)
    t0 = time.monotonic()
    # HAProxy may drop the first request sent on its pooled connection to a dead replica without
    # an answer (no replica left for the retry): README, "When a replica dies"; the next requests
    # find the replicas refusing connections and get the ingress's own answer
    resp, closed = None, 0
    while resp is None and closed < 5:
        try:
            resp = requests.post(f"{url}/v2/models/{MODEL}/infer", data=infer_body(0), timeout=60)
        except requests.ConnectionError:
            closed += 1
    waited = time.monotonic() - t0
    assert resp is not None, f"{closed} requests closed with no answer in {waited:.1f} s"
    # never Serve's plain-text 500: Kiln's 503, or (HAProxy's retries outlasting the outage through
    # its fallback to Serve's proxy) an answer by the replacement (seen once with retries 3, and
    # after 57 s on a machine at load 45, where Serve took that long to start the replacement)
    assert resp.status_code in (200, 503), (resp.status_code, resp.text, f"{waited:.1f} s")
    assert resp.headers["content-type"] == "application/json"
    if resp.status_code == 503:
        assert int(resp.headers["retry-after"]) >= 1
        assert "no replica of this model answered" in resp.json()["error"]
    not_ready = requests.get(f"{url}/v2/health/ready", timeout=30)
    wait_until(lambda: running_replicas() >= 1, 120, "a replacement replica")
    assert not_ready.status_code in (200, 503)  # racing the replacement; the JSON is what counts
    assert not_ready.headers["content-type"] == "application/json"
    wait_until(
        lambda: requests.get(f"{url}/v2/health/ready", timeout=30).status_code == 200,
        60,
        "the server to be ready again",
    )
