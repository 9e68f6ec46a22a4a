"""Blast radius: a canary candidate that aborts its process on one input, against a real served app
of 2 replicas under load (`kiln serve start`, HAProxy ingress, the session's Ray instance).

The candidate (tests/crash_models.py, a test-only builder the operator allows) is the stable
version's weights under a builder that calls ``os.abort()`` on the poison image. A rollout runs
each candidate in its own process beside the replica (kiln.models.isolated_runtime), so the abort
takes that process only: the stable version's requests, answered in the replica's own process, go
on; the rollout is rolled back within 2 gate intervals (the audit log's timestamps), and the audit
log says why. Four clients post unversioned infer requests throughout.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest
import requests

from conftest import last_json, run_kiln
from crash_models import ALLOW, poison_image, register_crashing_candidate
from kiln.waiting import wait_until
from served_models import InferLoad, digits_raw, register_artifact, uint8_infer_body

pytestmark = [pytest.mark.slow, pytest.mark.module_seconds(60)]  # 2 replicas, a rollout, a crash
MODEL = "digits-crash"  # its own registered model: the shared registry's versions stay as they are
CLIENTS = 4
INTERVAL_S = 1.0
WEIGHT = 30.0
STICKY = "X-User"
IMAGES = digits_raw(8)


def model_version_or_error(resp) -> tuple[int, str]:
    payload = resp.json()
    return resp.status_code, str(payload.get("model_version") or payload.get("error", ""))


@pytest.fixture(scope="module")
def allowed():
    """The operator allows the test-only builder: in this process and, through it, in `kiln serve
    start` and its replicas."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KILN_ALLOWED_BUILDERS", ALLOW)
        yield


@pytest.fixture(scope="module")
def versions(registry, allowed) -> tuple[str, str]:
    """(stable, candidate): the session's digits CNN registered again as MODEL v1, and the crashing
    candidate (its weights under the crashing builder) as v2."""
    from kiln import tracking as trk

    source = trk.resolve_model_dir(registry.uris["fp32-cnn"], registry.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="kiln-test-crash-") as tmp:
        copy = Path(tmp) / "model"
        shutil.copytree(source, copy)
        stable = register_artifact(registry.run_dir, MODEL, copy, "fp32", registry.tracking_uri)
    candidate = register_crashing_candidate(registry.tracking_uri, registry.run_dir, stable)
    return stable.rsplit("/", 1)[1], candidate


@pytest.fixture(scope="module")
def served(ray_cluster, registry, versions, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("crash-serving")
    proc = run_kiln(
        "serve",
        "start",
        f"models:/{MODEL}/{versions[0]}",
        "--port",
        "0",  # Kiln picks it (and picks again if it is taken before Serve binds it)
        "serve.deployment.replicas=2",
        "serve.deployment.num_cpus=0.25",
        "--address",
        ray_cluster,
        "--run-dir",
        str(run_dir),
        "--json",
        env={"MLFLOW_TRACKING_URI": registry.tracking_uri},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    yield {**last_json(proc.stdout), "run_dir": run_dir}
    run_kiln("serve", "stop", "--address", ray_cluster, "--run-dir", str(run_dir), timeout=300)


def sticky_key_to_candidate() -> str:
    """A sticky header value the canary routes to the candidate (its bucket is under the weight)."""
    from kiln.rollout.core.routing import sticky_bucket

    return next(k for i in range(1000) if sticky_bucket(k := f"user-{i}") < WEIGHT)


def test_a_candidate_that_aborts_its_process_fails_only_its_own_requests_and_is_rolled_back(
    served, versions
):
    from kiln.rollout.control.api import rollout_history, start_rollout
    from kiln.rollout.core.spec import RolloutOptions
    from kiln.rollout.core.store import RolloutStore

    stable, candidate = versions
    url, run_dir = served["url"], served["run_dir"]
    store = RolloutStore(run_dir, MODEL)

    def phase() -> str | None:
        record = store.load()
        return record.phase if record is not None else None

    with InferLoad(url, MODEL, IMAGES, CLIENTS, model_version_or_error) as load:
        wait_until(lambda: len(load.answers) >= 20, 60, "20 answers before the rollout")
        start_rollout(
            run_dir,
            None,
            MODEL,
            candidate,
            "canary",
            RolloutOptions(
                weight=WEIGHT,
                bake_s=600.0,
                interval_s=INTERVAL_S,
                gates=["error_rate<0.05"],
                sticky_header=STICKY,
            ),
        )
        wait_until(lambda: phase() == "running", 120, "the candidate loaded on both replicas")
        seen = len(load.answers)
        wait_until(
            lambda: any(v == candidate for _, v in load.answers[seen:]),
            60,
            "answers from the candidate",
        )
        # Each replica takes the running table at its own next report (0.5 s apart at most): a
        # poison that reached a replica still routing all to the stable version is answered by it
        # (200), and is sent again.
        sent: list[float] = []

        def send_poison() -> list[requests.Response] | None:
            sent.append(time.time())
            resp = requests.post(
                f"{url}/v2/models/{MODEL}/infer",
                data=uint8_infer_body(poison_image()),
                headers={STICKY: sticky_key_to_candidate()},
                timeout=60,
            )
            return [resp] if resp.status_code != 200 else None  # a 503 Response is falsy

        [poison] = wait_until(send_poison, 30, "the poison answered by the candidate", interval=0.2)
        sent_at = sent[-1]
        wait_until(lambda: phase() == "rolled_back", 30, "the rollback", interval=0.1)
        after = len(load.answers)
        # the other replica follows the rolled-back table at its next report (0.5 s)
        wait_until(
            lambda: (
                len(load.answers) >= after + 20
                and {a for a in load.answers[-20:]} == {(200, stable)}
            ),
            60,
            f"the last 20 answers by v{stable}",
        )
    answers = list(load.answers)
    entries = rollout_history(run_dir, MODEL)
    entries = entries[max(i for i, e in enumerate(entries) if e["decision"] == "start") :]
    lost = next(e for e in entries if e["decision"] == "version_lost")
    rollback = next(e for e in entries if e["decision"] == "rollback")
    crashed_candidate = [a for a in answers if a[0] == 503 and f"version {candidate} " in a[1]]
    failed_stable = [a for a in answers if a[0] != 200 and a not in crashed_candidate]
    print(  # the figures BENCHMARKS.md (Faults) quotes; shown with pytest -s
        f"candidate abort under load: {len(answers)} requests, "
        f"{sum(1 for _, v in answers if v == candidate)} answered by v{candidate}, "
        f"{len(crashed_candidate)} of its requests failed with it, {len(failed_stable)} others "
        f"failed; crash -> rollback {rollback['time'] - lost['crashed_at']:.2f}s, poison sent -> "
        f"rollback {rollback['time'] - sent_at:.2f}s"
    )
    # the poison request: Kiln's JSON 503 with Retry-After, naming the version and how it died
    assert poison.status_code == 503, (poison.status_code, poison.text)
    assert poison.headers["retry-after"] == "1"
    assert "SIGABRT" in poison.json()["error"] and f"version {candidate} " in poison.json()["error"]
    # rolled back within 2 gate intervals of the crash, and the audit log says why
    assert sent_at <= lost["crashed_at"] <= rollback["time"]
    assert rollback["time"] - lost["crashed_at"] <= 2 * INTERVAL_S
    assert lost["trigger"] == "fault" and "SIGABRT" in lost["cause"]
    assert rollback["trigger"] == "fault" and "process died" in rollback["reason"]
    assert rollback["weights"] == {stable: 100.0}
    # the replicas lived: the abort took the candidate's process only
    assert not [e for e in entries if e["decision"] == "replica_lost"]
    # the stable version's failures: at most the requests in flight at the crash (none expected)
    assert len(failed_stable) <= CLIENTS, failed_stable[:5]
