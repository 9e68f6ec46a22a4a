"""`kiln tracking serve --auth`: MLflow's basic-auth app in front of the store, credentials created
once (0600 in a 0700 folder) and never printed; a request without them is refused, one with them
(as jobs get them: MLFLOW_TRACKING_USERNAME / PASSWORD) is answered. Also: `kiln submit` forwards
those variables to the job's environment only.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest
import requests

from conftest import kiln_env
from kiln.local_ray import free_port, stop_session
from kiln.waiting import wait_until

pytestmark = pytest.mark.slow  # an MLflow server start: about 10-30 s on a loaded 2-core machine


def test_an_authenticated_tracking_server_refuses_requests_without_credentials(tmp_path):
    from kiln.cluster.tracking_server import tracking_server

    store, port = tmp_path / "tracking", free_port()
    assert tracking_server(port=port, store_dir=store).auth is False  # loopback: off by default
    assert tracking_server("0.0.0.0", free_port(), store_dir=tmp_path / "open").auth is True
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kiln.cli",
            "tracking",
            "serve",
            "--auth",
            "--port",
            str(port),
            "--dir",
            str(store),
        ],
        env=kiln_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # mlflow's workers: stopped with the session below
    )
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
    try:

        def answering() -> int | None:  # (a Response is falsy when its status is an error)
            try:
                return requests.get(url, timeout=5).status_code
            except requests.ConnectionError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                return None

        assert wait_until(answering, 180, "the tracking server answering") == 401
        creds = json.loads((store / "auth" / "credentials.json").read_text())
        assert stat.S_IMODE((store / "auth").stat().st_mode) == 0o700
        assert stat.S_IMODE((store / "auth" / "credentials.json").stat().st_mode) == 0o600
        assert requests.get(url, auth=(creds["username"], "wrong"), timeout=10).status_code == 401
        ok = requests.get(url, auth=(creds["username"], creds["password"]), timeout=10)
        assert ok.status_code == 200, ok.text
    finally:
        stop_session(proc.pid, None, timeout=20)
        output = proc.stdout.read().decode() if proc.stdout else ""
    assert "credentials required" in output and creds["password"] not in output


def test_submit_forwards_tracking_credentials_to_the_job_environment_only(monkeypatch):
    from kiln.commands.submit import job_env_vars

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "kiln")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-123")
    assert job_env_vars(False) == {
        "MLFLOW_TRACKING_USERNAME": "kiln",
        "MLFLOW_TRACKING_PASSWORD": "pw-123",
    }
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    assert job_env_vars(True) == {"KILN_DEBUG": "1"}
