"""Monitoring in a served app over real HTTP on 127.0.0.1: flags in responses, the monitor endpoint,
alerts to a real webhook receiver, Prometheus metrics, `kiln monitor status|report`.

Served: the digits CNN of served_models (with its monitor reference) and a copy of it registered
without one ("legacy"), started with `kiln serve start` and a small window, and a retraining policy:
two seconds of drift submit a one-epoch training job to the serving cluster (Jobs API).

The module serves on the local Ray instance `kiln serve start` starts (2 CPUs) rather than on the
conftest's `ray_cluster`: that one's dashboard agent takes Ray's fixed default port, which another
Ray instance on a shared machine may hold, and then its Jobs API cannot run jobs. Kiln's own
instance takes free ports for everything.
"""

from __future__ import annotations

import http.server
import json
import shutil
import threading

import numpy as np
import pytest
import requests

from conftest import last_json, run_kiln
from kiln.waiting import wait_until
from served_models import (
    VARIANTS,
    Registry,
    digits_raw,
    free_port,  # noqa: F401
    iris_parquet,
    png_b64,
)

pytestmark = pytest.mark.module_seconds(60)

WINDOW = 120
RETRAIN = [
    "serve.monitor.retrain.config=configs/train/digits_cnn.yaml",
    "serve.monitor.retrain.data_source=digits",
    "serve.monitor.retrain.after_s=2",
    "serve.monitor.retrain.overrides=[train.epochs=1, train.workers=1, train.cpus_per_worker=0.5, "
    "model.width=8, train.checkpoint.keep=1]",
    "serve.monitor.retrain.rollout.weight=50",
    "serve.monitor.retrain.rollout.bake_s=3",
    "serve.monitor.retrain.rollout.interval_s=1",
    "serve.monitor.retrain.rollout.gates=[error_rate<0.01]",
]


class Receiver(http.server.BaseHTTPRequestHandler):
    posts: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posts.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    """This module's own MLflow store and run dir: its retraining registers new digits versions and
    its rollout promotes one, which must change neither the version numbers other modules expect in
    the shared store nor what they serve from its run dir (a start serves the last promoted
    version)."""
    from kiln import tracking as trk

    run_dir = tmp_path_factory.mktemp("monitor-registry")
    reg = Registry(
        run_dir=run_dir,
        tracking_uri=trk.default_tracking_uri(run_dir),
        iris=iris_parquet(run_dir / "iris.parquet"),
    )
    reg.uris["fp32-cnn"] = VARIANTS["fp32-cnn"].register(reg)
    return reg


@pytest.fixture(scope="module")
def webhook():
    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/alerts"
    server.shutdown()


@pytest.fixture(scope="module")
def legacy_uri(registry) -> str:
    """The digits artifact registered again without monitor_reference.json (as older Kiln versions
    did)."""
    from kiln import tracking as trk

    src = trk.resolve_model_dir(registry.uris["fp32-cnn"], registry.tracking_uri)
    copy = registry.run_dir / "legacy-model"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("monitor_reference.json"))
    exp = trk.ensure_experiment(registry.tracking_uri, "legacy", registry.run_dir)
    run_id = trk.start_run(registry.tracking_uri, exp, "legacy", {trk.TAG_JOB: "test"})
    trk.log_artifacts(registry.tracking_uri, run_id, copy, trk.MODEL_ARTIFACT_PATH)
    trk.end_run(registry.tracking_uri, run_id)
    return f"models:/legacy/{trk.register_model(registry.tracking_uri, 'legacy', run_id)}"


@pytest.fixture(scope="module")
def served(registry, legacy_uri, webhook):
    proc = run_kiln(
        "serve",
        "start",
        registry.uris["fp32-cnn"],
        legacy_uri,
        f"serve.monitor.window={WINDOW}",
        "serve.monitor.min_rows=60",
        "serve.monitor.eval_every=20",
        f"serve.monitor.webhook_url={webhook}",
        *RETRAIN,
        "--port",
        "0",  # Kiln picks it (and picks again if it is taken before Serve binds it)
        "--num-cpus",
        "2",
        "--run-dir",
        str(registry.run_dir),
        "--json",
        env={"MLFLOW_TRACKING_URI": registry.tracking_uri},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    info = last_json(proc.stdout)
    yield info
    run_kiln("serve", "stop", "--run-dir", str(registry.run_dir), timeout=300)


def infer(url: str, images: np.ndarray, path: str = "/v2/models/digits/infer") -> dict:
    body = {
        "inputs": [
            {
                "name": "input",
                "datatype": "UINT8",
                "shape": list(images.shape),
                "data": images.ravel().tolist(),
            }
        ]
    }
    resp = requests.post(url + path, data=json.dumps(body), timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def monitor_cli(registry, *args: str):
    return run_kiln("monitor", *args, "--run-dir", str(registry.run_dir))


V1 = "/v2/models/digits/versions/1"


def send_noise(url: str, seed: int = 0) -> list[bool]:
    """A window of uniform-noise images to version 1 (by its versioned path: whichever version is
    stable, only version 1's monitor sees them); returns their OOD flags."""
    rng = np.random.default_rng(seed)
    flags: list[bool] = []
    for _ in range(WINDOW // 20):
        images = rng.integers(0, 256, (20, 1, 8, 8)).astype(np.uint8)
        flags += infer(url, images, f"{V1}/infer")["parameters"]["ood"]
    return flags


def v1_monitor(url: str) -> dict:
    return requests.get(f"{url}{V1}/monitor", timeout=30).json()["versions"]["1"]


@pytest.fixture
def drifting(served) -> None:
    """Version 1's drift alert firing (noise sent unless it already fires)."""
    if not v1_monitor(served["url"])["drift"]["alerting"]:
        send_noise(served["url"])
    wait_until(
        lambda: v1_monitor(served["url"])["drift"]["alerting"], 30, "v1's drift alert to fire"
    )


def test_each_response_carries_per_row_ood_flags(served):
    images = digits_raw(5)
    out = infer(served["url"], images)
    params = out["parameters"]
    assert len(params["ood"]) == 5 and all(isinstance(f, bool) for f in params["ood"])
    assert len(params["ood_score"]) == 5 and 0 < params["ood_threshold"] < 1
    assert [s < params["ood_threshold"] for s in params["ood_score"]] == params["ood"]
    predicted = requests.post(
        served["url"] + "/v2/models/digits/predict",
        json={"images": [png_b64(img) for img in images[:2]]},
        timeout=60,
    ).json()
    assert len(predicted["parameters"]["ood"]) == 2 and len(predicted["predictions"]) == 2
    legacy = infer(served["url"], images[:1], "/v2/models/legacy/infer")
    assert "parameters" not in legacy and legacy["outputs"]  # unmonitored: answers as before


def test_monitor_endpoint_does_not_shadow_the_protocol(served):
    resp = requests.post(served["url"] + "/v2/models/digits/monitor", timeout=30)
    assert resp.status_code == 405 and "GET" in resp.json()["error"]
    missing = requests.get(served["url"] + "/v2/models/digits/versions/9/monitor", timeout=30)
    assert missing.status_code == 404 and "no served version '9'" in missing.json()["error"]
    # no API key on this server: its raw rows and reference statistics go to nobody over HTTP
    # (`kiln monitor report` reads them through Ray: test_report_writes_html_with_plots)
    window = requests.get(served["url"] + "/v2/models/digits/monitor?window=1", timeout=30)
    assert window.status_code == 403 and "serve.api_key_env" in window.json()["error"]


def test_noise_is_flagged_drift_alerts_and_the_webhook_gets_the_json(served, registry):
    flags = send_noise(served["url"])
    assert np.mean(flags) >= 0.8
    alert = wait_until(
        lambda: next(
            (p for p in Receiver.posts if p.get("signal") == "drift" and p.get("version") == "1"),
            None,
        ),
        30,
        "v1's drift alert at the webhook",
    )
    assert (alert["kind"], alert["model"], alert["version"], alert["state"]) == (
        "kiln.monitor.alert",
        "digits",
        "1",
        "firing",
    )
    assert (
        alert["value"] > alert["threshold"] == 0.3
        and "input.brightness" in alert["details"]["drifted"]
    )

    proc = monitor_cli(registry, "status", "digits", "--json")
    assert proc.returncode == 0, proc.stderr
    status = last_json(proc.stdout)["versions"]["1"]
    assert status["drift"]["score"] > 0.3 and status["drift"]["alerting"]
    assert status["ood"]["window_rate"] >= 0.8 and status["ood"]["alerting"]
    assert status["window"]["rows"] == WINDOW
    assert "drifted: input.brightness" in proc.stderr or "input.brightness" in proc.stderr


def test_unmonitored_version_gets_a_one_line_warning(served, registry):
    proc = monitor_cli(registry, "status", "legacy")
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stdout.splitlines() if "warning" in line]
    assert (
        len(warning) == 1
        and "not monitored" in warning[0]
        and "monitor_reference.json" in warning[0]
    )


def test_monitoring_metrics_per_version(served, drifting):
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "ray_kiln_monitor_drift_score",
        "ray_kiln_monitor_ood_rate",
        "ray_kiln_monitor_ood_rows_total",
    }

    def exported() -> list | None:
        """The model's samples, once every wanted metric is there and the exported drift score is
        the drifting window's (an export from before the drift shows the old, lower score)."""
        text = requests.get(served["metrics_url"], timeout=10).text
        samples = [
            s
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.labels.get("model") == "digits"
        ]
        drift = [s.value for s in samples if s.name == "ray_kiln_monitor_drift_score"]
        return samples if wanted <= {s.name for s in samples} and max(drift) > 0.3 else None

    samples = wait_until(
        exported, 90, "the monitoring metrics with a drift score above 0.3", max_interval=2.0
    )
    assert any(
        s.name == "ray_kiln_monitor_feature_psi" and s.labels.get("feature") == "input.brightness"
        for s in samples
    )


def test_report_writes_html_with_plots(served, registry, drifting, tmp_path):
    proc = monitor_cli(registry, "report", "digits", "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    paths = last_json(proc.stdout)
    page = (tmp_path / "monitor.html").read_text()
    assert paths["html"] == str(tmp_path / "monitor.html") and "input.brightness" in page
    png = tmp_path / "digits-v1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "data:image/png;base64" in page


def test_status_of_an_unknown_model_is_one_error_line(served, registry):
    proc = monitor_cli(registry, "status", "nosuch")
    assert (
        proc.returncode == 2
        and proc.stderr.strip().startswith("error:")
        and "nosuch" in proc.stderr
    )
    assert len(proc.stderr.strip().splitlines()) == 1


# --- closing the loop, and the gates (they change what is served: last) --------------------------


def audit(registry) -> list[dict]:
    from kiln.rollout.core.store import RolloutStore

    return RolloutStore(registry.run_dir, "digits").history()


def rollout_phase(registry) -> str | None:
    from kiln.rollout.core.store import RolloutStore

    record = RolloutStore(registry.run_dir, "digits").load()
    return record.phase if record else None


@pytest.fixture(scope="module")
def retrained(served, registry) -> dict:
    """The loop end to end, once per module: version 1 drifts (noise), the replica submits a
    retraining job, the job registers a version, its rollout runs under in-distribution traffic
    until it finishes. Returns version 1's retrain status and the audit log at that point. Tests
    that start rollouts of their own depend on it, so that the loop's rollout never meets theirs."""
    if not v1_monitor(served["url"]).get("retrain", {}).get("events"):
        send_noise(served["url"])

    def outcome() -> dict | None:
        retrain = v1_monitor(served["url"])["retrain"]
        steps = [e["step"] for e in retrain["events"]]
        return retrain if "rollout" in steps or "failed" in steps else None

    retrain = wait_until(outcome, 300, "a retraining outcome", max_interval=2.0)
    images = digits_raw(200)

    def finished() -> bool:  # gates need traffic: in-distribution requests meanwhile
        if rollout_phase(registry) in ("promoted", "rolled_back"):
            return True
        for i in range(0, 200, 10):
            infer(served["url"], images[i : i + 10])
        return False

    if "rollout" in [e["step"] for e in retrain["events"]]:
        wait_until(finished, 120, "the retrained version's rollout to finish", interval=0.0)
    return {"retrain": retrain, "phase": rollout_phase(registry), "audit": audit(registry)}


@pytest.mark.slow  # a real training job on the serving cluster, then a rollout (about a minute)
def test_sustained_drift_retrains_and_rolls_the_new_version_out(retrained, registry):
    """The loop end to end: after the noise the drift alert keeps firing; after_s later the
    replica submits `train` through the Jobs API (kiln submit's path) with the configured data
    source; the job registers a new version; a gated canary rollout of it starts (trigger: monitor)
    and, under in-distribution traffic, is promoted. Every step is in the rollout audit log."""
    from kiln import tracking as trk

    retrain = retrained["retrain"]
    steps = [e["step"] for e in retrain["events"]]
    assert steps[:4] == ["triggered", "submitted", "registered", "rollout"], json.dumps(
        retrain["events"]
    )
    triggered, submitted, registered, rollout = retrain["events"][:4]
    assert triggered["detail"]["drift"] > 0.3 and triggered["detail"]["firing_s"] >= 2
    assert submitted["submission_id"].startswith("kiln-retrain-digits-v1-")
    assert (
        "jobs/train.py" in submitted["detail"]["entrypoint"]
        and "data.source=digits" in submitted["detail"]["entrypoint"]
    )
    model_uri = registered["detail"]["model_uri"]
    name, version = model_uri[len("models:/") :].split("/")
    assert name == "digits" and int(version) > 1 and rollout["detail"]["to_version"] == version
    assert (
        trk.resolve_model_dir(model_uri, registry.tracking_uri) / "monitor_reference.json"
    ).is_file()

    assert retrained["phase"] == "promoted", retrained["audit"][-3:]
    decisions = [(e["decision"], e.get("trigger")) for e in retrained["audit"]]
    assert decisions[:5] == [
        ("retrain-triggered", "monitor"),
        ("retrain-submitted", "monitor"),
        ("retrain-registered", "monitor"),
        ("start", "monitor"),
        ("retrain-rollout", "monitor"),
    ] or decisions[:5] == [
        ("retrain-triggered", "monitor"),
        ("retrain-submitted", "monitor"),
        ("retrain-registered", "monitor"),
        ("retrain-rollout", "monitor"),
        ("start", "monitor"),
    ]
    assert decisions[-1] == ("promote", "auto")
    webhook_steps = [p["step"] for p in Receiver.posts if p.get("kind") == "kiln.monitor.retrain"]
    assert webhook_steps[:4] == ["triggered", "submitted", "registered", "rollout"]


@pytest.mark.slow  # trains one more version, then a rollout
def test_a_rollout_whose_new_version_sees_drift_is_rolled_back_by_the_drift_gate(
    served, registry, retrained
):
    """Noise images routed to the new version (canary at 100%): its own window drifts and is mostly
    OOD, so the drift and ood_rate gates fail and the controller rolls back, the reason in the audit
    log."""
    from served_models import CNN, DIGITS, train_and_register

    fresh = train_and_register(registry.run_dir, "digits", DIGITS, CNN, epochs=2, seed=2).rsplit(
        "/", 1
    )[1]
    proc = run_kiln(
        "rollout",
        "start",
        "digits",
        "--to",
        fresh,
        "--strategy",
        "canary",
        "--weight",
        "100",
        "--bake",
        "60s",
        "--interval",
        "1s",
        "--gate",
        "drift<0.3",
        "--gate",
        "ood_rate<0.5",
        "--gate",
        "error_rate<0.01",
        "--run-dir",
        str(registry.run_dir),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    rng = np.random.default_rng(1)

    def rolled_back() -> bool:  # drifted traffic until the gates roll the new version back
        if rollout_phase(registry) == "rolled_back":
            return True
        out = infer(served["url"], rng.integers(0, 256, (10, 1, 8, 8)).astype(np.uint8))
        assert out["model_version"] in (fresh, rollout_stable(registry))
        return False

    wait_until(rolled_back, 120, "the drift gate to roll the new version back", interval=0.0)
    # The module's retraining loop sees the same drift and may audit a new submission after the
    # rollback: the rollback is the last rollout decision, not necessarily the last entry.
    last = [e for e in audit(registry) if e["decision"] in ("promote", "rollback")][-1]
    assert (last["decision"], last["trigger"]) == ("rollback", "gate")
    assert "drift<0.3 failed" in last["reason"] and last["gates"]["drift<0.3"]["value"] > 0.3
    assert "ood_rate<0.5 failed" in last["reason"] and last["gates"]["ood_rate<0.5"]["value"] >= 0.8
    assert (
        last["gates"]["error_rate<0.01"]["ok"] is True
    )  # a healthy version, rolled back for its inputs
    history = run_kiln("rollout", "history", "digits", "--run-dir", str(registry.run_dir))
    assert "drift<0.3 failed" in history.stdout


def rollout_stable(registry) -> str:
    from kiln.rollout.core.store import RolloutStore

    return RolloutStore(registry.run_dir, "digits").load().stable
