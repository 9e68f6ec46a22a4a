"""kiln serve without --address: Kiln starts its own local Ray instance, which outlives the CLI call
and which `kiln serve status` and `kiln serve stop` find again through RUN_DIR/serve/state.json.

Uses the default ingress (HAProxy, with its own ports and files per instance), and checks that
nothing the instance started listens beyond loopback but Ray's own token-protected listeners
(README: Safety). The other serving modules run the same default on the shared Ray instance.
"""

# Fixtures imported from served_models by name are redefined as parameters (pytest's way):
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import last_json, run_kiln
from kiln.waiting import wait_until
from listeners import assert_loopback_only, cmdline
from served_models import digits_raw, free_port, uint8_batch_body

pytestmark = pytest.mark.module_seconds(35)


def other_interface_ip() -> str | None:
    """An address of this machine other than loopback (to check that nothing listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def serve_replica_environs(session: int) -> list[bytes]:
    """The environments the Serve replicas of a Kiln-started head (the leader of process session
    ``session``) were started with."""
    from kiln.local_ray import session_members

    found = []
    for pid in session_members(session):
        if "ServeReplica" in cmdline(pid):
            try:
                found.append(Path(f"/proc/{pid}/environ").read_bytes())
            except OSError:
                continue  # gone meanwhile
    return found


@pytest.mark.slow  # starts its own Ray instance: about a minute
def test_local_instance_outlives_the_cli_and_stops_cleanly(registry, tmp_path):
    from kiln.models.predictor import load_predictor
    from kiln.rollout.core.inflight import journals_dir

    run_dir = tmp_path / "runs"
    env = {"MLFLOW_TRACKING_URI": registry.tracking_uri}
    port = free_port()
    proc = run_kiln(
        "serve",
        "start",
        registry.uris["fp32-cnn"],
        "--num-cpus",
        "1",
        "--port",
        str(port),
        "--run-dir",
        str(run_dir),
        "--json",
        env=env,
        timeout=600,
    )
    try:
        assert proc.returncode == 0, proc.stderr
        info = last_json(proc.stdout)
        pid = info["local_ray_pid"]
        assert info["url"] == f"http://127.0.0.1:{port}" and info["ingress"] == "haproxy"
        assert info["metrics_url"].startswith("http://127.0.0.1:")
        assert info["grpc_url"].startswith("127.0.0.1:")  # OIP over gRPC, on loopback too
        assert_loopback_only(pid)
        state = json.loads((run_dir / "serve" / "state.json").read_text())
        assert state["local_ray"]["pid"] == pid and pid_alive(
            pid
        )  # the CLI has exited; the instance has not

        x = digits_raw(4)
        body = uint8_batch_body(x)
        resp = requests.post(f"{info['url']}/v2/models/digits/infer", json=body, timeout=30)
        assert resp.status_code == 200, resp.text
        probs = np.asarray(resp.json()["outputs"][0]["data"], np.float32).reshape(4, 10)
        expected = load_predictor(registry.uris["fp32-cnn"], registry.tracking_uri).predict_proba(x)
        np.testing.assert_allclose(probs, expected, atol=1e-5)

        # Serving replicas keep glibc's default arenas: only a training job's workers get
        # MALLOC_ARENA_MAX=1 (kiln.ray_connection.JOB_WORKER_ENV), and the CLI here had none.
        arenas = [
            [v for v in env.split(b"\0") if v.startswith(b"MALLOC_ARENA_MAX=")]
            for env in serve_replica_environs(pid)
        ]  # only that variable: a replica's environment may hold secrets, not for a test log
        assert arenas and all(found == [] for found in arenas), arenas

        ip = other_interface_ip()
        if ip:  # 127.0.0.1 by default: the HTTP port does not answer on the machine's other address
            with pytest.raises(requests.exceptions.ConnectionError):
                requests.get(f"http://{ip}:{port}/v2/health/live", timeout=5)

        again = run_kiln(
            "serve", "start", registry.uris["fp32-cnn"], "--run-dir", str(run_dir), env=env
        )
        assert again.returncode == 2 and "Kiln is already serving at" in again.stderr

        status = run_kiln("serve", "status", "--run-dir", str(run_dir), "--json")
        assert status.returncode == 0, status.stderr
        st = last_json(status.stdout)
        assert (
            st["local_ray_pid"] == pid and st["url"] == info["url"] and st["ingress"] == "haproxy"
        )
        assert [(m["name"], m["version"]) for m in st["models"]] == [("digits", "1")]
        # the replica counts its requests in flight in a file under the run dir (rollouts read it
        # when a replica dies)
        inflight = journals_dir(run_dir)
        assert [p.parent.name for p in inflight.glob("*/*.bin")] == ["digits"]
    finally:
        stop = run_kiln("serve", "stop", "--run-dir", str(run_dir), "--json", timeout=300)
    assert stop.returncode == 0, stop.stderr
    assert last_json(stop.stdout)["local_ray_pid"] == pid
    wait_until(lambda: not pid_alive(pid), 30, f"the local Ray instance (pid {pid}) to exit")
    assert not (run_dir / "serve" / "state.json").exists()
    with pytest.raises(requests.exceptions.ConnectionError):  # HAProxy went with the instance
        requests.get(f"{info['url']}/v2/health/live", timeout=5)
    assert not Path(state["local_ray"]["temp_dir"]).exists()
    # The replica died with the instance and could not remove its in-flight file; a stop on
    # purpose removes it, so that the next start's rollouts do not count a replica death.
    assert list(inflight.glob("*/*.bin")) == []
    nothing = run_kiln("serve", "status", "--run-dir", str(run_dir))
    assert nothing.returncode == 2 and "nothing is being served" in nothing.stderr
