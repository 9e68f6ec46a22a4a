"""`kiln tracking serve --auth`: MLflow's basic-auth app in front of the store, credentials created
once (0600 in a 0700 folder) and never printed; a request without them is refused, one with them
(as jobs get them: MLFLOW_TRACKING_USERNAME / PASSWORD) is answered. Also: `kiln submit` forwards
those variables to the job's environment only. As cluster.yaml starts it: the credentials in
MLflow's client file (`kiln tracking credentials`, `--credentials-file`), which a run reads by
itself; without the file a run is refused; the password is in no param, tag, log or output.
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

# an MLflow server start: about 10-30 s on a loaded 2-core machine
pytestmark = [pytest.mark.slow, pytest.mark.module_seconds(55)]


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


def _start_server(port: int, store, *extra: str, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "tracking", "serve", "--port", str(port)]
        + ["--dir", str(store), *extra],
        env=env or kiln_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # mlflow's workers: stopped with the session
    )


def _tiny_model(directory):
    from kiln.data.preprocess import Preprocessing
    from kiln.models.artifact import build_model, save_artifact
    from kiln.models.spec import ModelSpec

    spec = ModelSpec(
        architecture="mlp",
        kwargs={"hidden": [4]},
        input_shape=[2],
        labels=["no", "yes"],
        preprocessing=Preprocessing(kind="tabular", mean=[0.0] * 2, std=[1.0] * 2),
    )
    save_artifact(build_model(spec), spec, directory)
    return directory


def test_the_cluster_server_takes_its_credentials_from_mlflows_client_file(tmp_path, monkeypatch):
    """As cluster.yaml runs it: `kiln tracking credentials` writes ~/.mlflow/credentials (what the
    file_mounts copy to every node), `kiln tracking serve --credentials-file` makes its user the
    admin; a run that finds the file logs and registers without any variable; without it, refused;
    the password shows in no param, tag, output or server log."""
    from mlflow.exceptions import MlflowException

    from kiln import tracking as trk
    from kiln.cluster.tracking_server import PASSWORD_ENV, USERNAME_ENV, read_client_credentials
    from served_models import register_artifact

    home = tmp_path / "home"
    home.mkdir()
    env = kiln_env({"HOME": str(home)})
    made = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "tracking", "credentials"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    creds = home / ".mlflow" / "credentials"
    user, password = read_client_credentials(creds)
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert stat.S_IMODE(creds.parent.stat().st_mode) == 0o700
    assert password not in made.stdout + made.stderr
    port, store = free_port(), tmp_path / "tracking"
    proc = _start_server(port, store, "--credentials-file", "~/.mlflow/credentials", env=env)
    uri = f"http://127.0.0.1:{port}"
    try:

        def answering() -> int | None:
            try:
                search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
                return requests.get(search, timeout=5).status_code
            except requests.ConnectionError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                return None

        assert wait_until(answering, 180, "the tracking server answering") == 401
        # a run on a node that has the file: MLflow's client reads it, no variable is set
        for name in (USERNAME_ENV, PASSWORD_ENV, "MLFLOW_TRACKING_URI"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HOME", str(home))
        model_uri = register_artifact(tmp_path, "creds", _tiny_model(tmp_path / "m"), "fp32", uri)
        version = trk.model_version_for(uri, model_uri)
        run = trk.get_run(uri, version.run_id)
        assert run.info.status == "FINISHED" and version.tags["kiln.variant"] == "fp32"
        # a node without the file is refused
        monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
        with pytest.raises(MlflowException, match="401|nauthorized|credentials"):
            trk.client(uri).get_run(version.run_id)
    finally:
        stop_session(proc.pid, None, timeout=20)
        output = proc.stdout.read().decode() if proc.stdout else ""
    assert "credentials required" in output and str(creds) in output
    shown = [output, json.dumps(dict(run.data.params)), json.dumps(dict(run.data.tags))]
    shown.append(json.dumps(dict(version.tags)))
    assert not [text for text in shown if password in text]
    logs = [p.read_text(errors="replace") for p in store.rglob("*.log")]
    assert not [text for text in logs if password in text]
    assert user == "kiln"


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
