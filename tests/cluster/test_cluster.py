"""The parts of running on a cluster that need no cluster: job specs, runtime envs, auth tokens,
cluster-launcher configs, the tracking server's command, process sessions, and clear failures for
unreachable addresses."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import kiln
from conftest import REPO, kiln_env, last_json, run_kiln
from kiln import ray_connection as auth
from kiln.cluster.jobs import JobState, error_line, summary_line
from kiln.cluster.submit import WORKING_DIR_EXCLUDES, build_runtime_env, job_spec, kiln_requirements
from kiln.errors import KilnError
from kiln.local_ray import free_port, is_running, session_members, stop_session
from kiln.waiting import wait_until

pytestmark = pytest.mark.module_seconds(10)

CONFIG = "configs/train/digits_cnn.yaml"


# ---- job specs and runtime envs
# -------------------------------------------------------------------


def test_job_spec_runs_the_jobs_script_with_the_config_inside_the_project(monkeypatch):
    monkeypatch.chdir(REPO / "configs")  # a config given relative to where the user stands
    spec = job_spec(
        "train", "train/digits_cnn.yaml", ["train.lr=0.01", "experiment.name=my run"], REPO
    )
    assert spec.config == CONFIG
    assert shlex.split(spec.entrypoint()) == [
        "python",
        "jobs/train.py",
        CONFIG,
        "train.lr=0.01",
        "experiment.name=my run",
        "--json",
    ]
    assert (
        shlex.split(
            job_spec(
                "train", str(REPO / CONFIG), [], REPO, python="/opt/py/bin/python3"
            ).entrypoint()
        )[0]
        == "/opt/py/bin/python3"
    )


def test_job_spec_names_what_is_wrong(tmp_path):
    with pytest.raises(
        KilnError,
        match=r"no job 'serve': .*jobs/serve.py does not exist "
        r"\(jobs there: compress, train, tune;",
    ):
        job_spec("serve", CONFIG, [], REPO)
    with pytest.raises(KilnError, match="not a plain name"):
        job_spec("../train", CONFIG, [], REPO)
    outside = tmp_path / "c.yaml"
    outside.write_text("{}")
    with pytest.raises(KilnError, match=f"config {outside} is outside the working dir {REPO}"):
        job_spec("train", str(outside), [], REPO)
    with pytest.raises(KilnError, match="config file not found: configs/nope.yaml"):
        job_spec("train", "configs/nope.yaml", [], REPO)


def test_runtime_env_ships_the_project_and_the_kiln_package_and_passes_rays_own_check():
    from ray.runtime_env import RuntimeEnv

    env = build_runtime_env(job_spec("train", str(REPO / CONFIG), [], REPO), "http://10.0.0.5:5000")
    assert env["working_dir"] == str(REPO)
    assert env["py_modules"] == [str(Path(kiln.__file__).resolve().parent)]
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://10.0.0.5:5000"
    assert env["env_vars"][
        "KILN_CODE_VERSION"
    ]  # .git is not shipped: the version travels as a variable
    assert "pip" not in env
    RuntimeEnv(**env)  # raises on a field Ray does not accept


def test_with_deps_installs_kilns_requirements_but_not_ray_or_torch():
    reqs = kiln_requirements()
    names = {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() for r in reqs}
    assert {"mlflow", "pydantic", "pyarrow", "safetensors"} <= names
    assert not names & {"ray", "torch", "torchvision", "pytest"}
    env = build_runtime_env(job_spec("train", str(REPO / CONFIG), [], REPO), with_deps=True)
    assert env["pip"] == reqs


def test_the_shipped_working_dir_leaves_out_vcs_virtualenvs_and_run_outputs(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    project = tmp_path / "proj"
    for rel in [
        "configs/train/a.yaml",
        "jobs/train.py",
        "models/mine.py",
        ".git/HEAD",
        ".venv/bin/python",
        "runs/mlflow.db",
        "mlruns/0/meta.yaml",
        "runs/checkpoints/x/state.json",
        "bench/out/r.json",
        "platform/kiln/__init__.py",
        "jobs/__pycache__/train.cpython-311.pyc",
    ]:
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text("x")
    target = tmp_path / "pkg.zip"
    create_package(str(project), target, include_gitignore=False, excludes=WORKING_DIR_EXCLUDES)
    shipped = sorted(n for n in zipfile.ZipFile(target).namelist() if not n.endswith("/"))
    assert shipped == ["configs/train/a.yaml", "jobs/train.py", "models/mine.py"]


def test_a_driver_joining_a_cluster_ships_its_kiln_unless_the_job_already_does(monkeypatch):
    from kiln.ray_connection import with_kiln_package

    package = os.path.dirname(os.path.abspath(kiln.__file__))
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert with_kiln_package(None) == {
        "py_modules": [package],
        "excludes": ["__pycache__", "*.pyc"],
    }
    assert with_kiln_package({"env_vars": {"A": "1"}})["env_vars"] == {"A": "1"}
    # Inside a job submitted with `ray job submit --runtime-env-json '{"excludes": [...]}'`: Ray
    # refuses a second excludes field, so only py_modules is added.
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"excludes": [".git"]}})
    )
    assert with_kiln_package(None) == {"py_modules": [package]}
    # Inside a job from `kiln submit`: kiln is shipped already.
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"py_modules": ["gcs://x.zip"]}})
    )
    assert with_kiln_package(None) is None


def test_the_workers_of_a_training_job_start_on_one_malloc_arena_unless_told_otherwise(monkeypatch):
    """JOB_WORKER_ENV (MALLOC_ARENA_MAX=1) reaches the job's runtime env on every path: a local
    instance, a driver joining a cluster (both through ``with_worker_env``), a job `kiln submit`
    sends. A caller's own value wins, and a variable the submitted job already sets is not set
    again (Ray refuses one set twice). ``worker_env={}`` (serving's) adds none."""
    from kiln.cluster.submit import JobSpec
    from kiln.ray_connection import JOB_WORKER_ENV, local_runtime_env, with_worker_env

    assert JOB_WORKER_ENV == {"MALLOC_ARENA_MAX": "1"}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert local_runtime_env(None)["env_vars"] == {
        "RAY_worker_niceness": "0",
        "MALLOC_ARENA_MAX": "1",
    }
    mine = {"env_vars": {"MALLOC_ARENA_MAX": "4", "A": "1"}, "pip": ["x"]}
    assert local_runtime_env(mine) == {
        "env_vars": {"RAY_worker_niceness": "0", "MALLOC_ARENA_MAX": "4", "A": "1"},
        "pip": ["x"],
    }
    assert with_worker_env(None, JOB_WORKER_ENV) == {"env_vars": {"MALLOC_ARENA_MAX": "1"}}
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR",
        json.dumps({"runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "2"}}}),
    )
    assert with_worker_env(None, JOB_WORKER_ENV) is None
    assert local_runtime_env(None, worker_env={}) == {"env_vars": {"RAY_worker_niceness": "0"}}
    assert with_worker_env({"env_vars": {"B": "1"}}, JOB_WORKER_ENV) == {"env_vars": {"B": "1"}}
    spec = JobSpec(job="train", config="configs/train/digits_cnn.yaml", project=REPO)
    assert build_runtime_env(spec)["env_vars"]["MALLOC_ARENA_MAX"] == "1"
    assert (
        build_runtime_env(spec, env_vars={"MALLOC_ARENA_MAX": "8"})["env_vars"]["MALLOC_ARENA_MAX"]
        == "8"
    )


# ---- a job's outcome, from its logs
# ---------------------------------------------------------------


def test_summary_is_the_last_json_object_line_and_the_error_is_the_jobs_own_line():
    logs = "\n".join(
        [
            "kiln train: cnn",
            '{"not": "last"}',
            "epoch 1",
            '{"run_id": "abc", "metrics": {"a": 1}}',
            "(RayTrainWorker) some warning",
            "",
        ]
    )
    assert summary_line(logs) == {"run_id": "abc", "metrics": {"a": 1}}
    assert summary_line("no json here\n[1, 2]\n") is None
    state = JobState(
        "j",
        "FAILED",
        "train",
        "python jobs/train.py",
        "Job entrypoint command failed with exit code 2\nmore",
        None,
        None,
        2,
    )
    assert (
        error_line("a\nValueError: inner\nerror: data.source: file not found: x\nbye\n", state)
        == "data.source: file not found: x"
    )
    assert error_line("a\nTraceback\nValueError: boom\n", state) == "ValueError: boom"
    assert error_line("", state) == "Job entrypoint command failed with exit code 2"


# ---- auth tokens
# ----------------------------------------------------------------------------------


def test_the_token_is_found_where_ray_looks_for_it_in_rays_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    assert auth.find_token() is None and auth.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth.find_token() == "from-home"
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert auth.find_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth.auth_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth.find_token() is None


# ---- addresses
# ------------------------------------------------------------------------------------


def test_a_token_cluster_joined_without_token_mode_says_what_to_set(ray_cluster, tmp_path):
    """The session's instance uses Ray's token authentication (``ray.init``'s default in Ray
    2.60). Ray sends its token to a named address only with ``RAY_AUTH_MODE=token``, so without it
    the connect is refused; the error line says what to set, and where the token is."""
    env = kiln_env({"RAY_gcs_server_port_wait_time_s": "2"})  # Ray retries the GCS 2 s, not 20
    env.pop("RAY_AUTH_MODE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "train", CONFIG, "--address", ray_cluster]
        + [f"experiment.run_dir={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]  # after Ray's own warnings of each retry
    assert line.startswith(f"error: cannot reach Ray at {ray_cluster} ("), line
    assert f"set RAY_AUTH_MODE=token (a token is at {auth.token_source()};" in line, line
    assert not (tmp_path / "mlflow.db").exists()  # nothing recorded


def test_the_address_comes_from_the_flag_then_rays_variables_then_the_local_head(
    monkeypatch, tmp_path
):
    from kiln.cluster.client import DEFAULT_ADDRESS, resolve_address
    from kiln.cluster.local import LocalCluster, state_path
    from kiln.local_ray import start_ticks

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) == DEFAULT_ADDRESS == "http://127.0.0.1:8265"
    assert resolve_address("headnode") == "http://headnode:8265"
    assert resolve_address("10.0.0.5:9000") == "http://10.0.0.5:9000"
    assert resolve_address("https://ray.example.com/") == "https://ray.example.com"
    # A head recorded by `kiln cluster start` (here: this very process stands in for it, so it
    # "runs").
    state_path().write_text(
        json.dumps(
            LocalCluster(
                pid=os.getpid(),
                started=start_ticks(os.getpid()),
                dashboard_url="http://127.0.0.1:45678",
                gcs_address="x:1",
                temp_dir="/nonexistent",
                log_file="-",
            ).to_dict()
        )
    )
    assert resolve_address(None) == "http://127.0.0.1:45678"
    monkeypatch.setenv(
        "RAY_ADDRESS", "10.0.0.5:6379"
    )  # a GCS address is for ray.init, not the Jobs API
    assert resolve_address(None) == "http://127.0.0.1:45678"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265")
    assert resolve_address(None) == "http://10.0.0.5:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.6:8265")
    assert resolve_address(None) == "http://10.0.0.6:8265"
    assert resolve_address("http://10.0.0.7:8265") == "http://10.0.0.7:8265"


# ---- unreachable addresses
# ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args", [["submit", "train", CONFIG], ["jobs", "list"], ["jobs", "status", "x"]]
)
def test_an_unreachable_address_is_one_clear_line(args):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = run_kiln(*args, "--address", address, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot reach the Ray Jobs API at {address} (Connection refused); is the cluster "
        "running? "
        "(start one with 'kiln cluster start', or pass --address http://HOST:8265)"
    ]


def test_an_address_whose_host_does_not_resolve_says_so_not_that_nothing_answers():
    """A typo in a host name is not a cluster that is down: both checks (a Ray address, a Jobs
    API URL) name the host that does not resolve. Name lookups only, nothing is contacted."""
    from kiln.cluster.client import check_reachable
    from kiln.errors import KilnError
    from kiln.ray_connection import check_ray_address

    host = "no-such-host.invalid"  # RFC 2606: never resolves
    with pytest.raises(KilnError) as ray_address:
        check_ray_address(f"{host}:6379")
    assert str(ray_address.value).startswith(
        f"cannot reach Ray at {host}:6379: host '{host}' does not resolve ("
    )
    with pytest.raises(KilnError) as jobs_api:
        check_reachable(f"http://{host}:8265")
    assert str(jobs_api.value).startswith(
        f"cannot reach the Ray Jobs API at http://{host}:8265: host '{host}' does not resolve ("
    )
    assert str(jobs_api.value).endswith("check --address (http://HOST:8265)")
    port = free_port()  # nothing listens there: that one is "nothing answers"
    with pytest.raises(KilnError, match=r": nothing answers \(Connection refused\)$"):
        check_ray_address(f"127.0.0.1:{port}")


def test_a_config_mistake_is_caught_before_anything_is_submitted():
    # Nothing listens at the address: the config error coming first shows nothing was contacted.
    proc = run_kiln(
        "submit", "train", CONFIG, "train.epoch=3", "--address", f"http://127.0.0.1:{free_port()}"
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown config key 'train.epoch' (did you mean 'train.epochs'?)"
    ]


def test_an_address_that_is_not_a_jobs_api_is_one_clear_line():
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proc = run_kiln("jobs", "list", "--address", f"127.0.0.1:{server.server_port}", timeout=60)
    finally:
        server.shutdown()
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: http://127.0.0.1:{server.server_port} does not answer as a Ray Jobs API"
    )


# ---- cluster-launcher configs
# -----------------------------------------------------------------------


def test_cluster_yaml_passes_rays_own_validation():
    from kiln.cluster.launcher import validate_cluster_config

    summary = validate_cluster_config(REPO / "cluster.yaml")
    assert summary.provider == "aws" and summary.head_node_type == "head"
    types = {t.name: t for t in summary.node_types}
    assert types["gpu_worker"].node_config["InstanceType"].startswith("g")  # a GPU instance type
    assert (types["gpu_worker"].min_workers, types["gpu_worker"].max_workers) == (0, 4)
    proc = run_kiln("cluster", "validate", "cluster.yaml", "--json", check=True)
    assert last_json(proc.stdout)["cluster_name"] == "kiln"


def _broken_copy(tmp_path, change) -> Path:
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    change(cfg)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"),
            "available_node_types.gpu_worker: 'node_config' is a required property",
        ),
        (lambda c: c.pop("provider"), "missing required field 'provider'"),
        (
            lambda c: c["available_node_types"]["gpu_worker"].update(max_workers="four"),
            "available_node_types.gpu_worker.max_workers: 'four' is not of type 'integer'",
        ),
        (
            lambda c: c.update(head_node_type="cpu_head"),
            "`head_node_type` must be one of `available_node_types`.",
        ),
    ],
)
def test_a_broken_cluster_yaml_fails_validation_with_one_line(tmp_path, change, message):
    path = _broken_copy(tmp_path, change)
    proc = run_kiln("cluster", "validate", str(path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {path}: {message}"
    assert "Traceback" not in proc.stderr


# ---- the local head, without starting one
# ---------------------------------------------------------


def test_cluster_status_and_stop_without_a_started_head(tmp_path):
    env = {"KILN_HOME": str(tmp_path)}
    status = run_kiln("cluster", "status", "--json", env=env, check=True)
    assert last_json(status.stdout) == {"running": False, "ray_version": None, "nodes": []}
    assert "nothing to stop" in run_kiln("cluster", "stop", env=env, check=True).stdout


def test_cluster_start_refuses_a_taken_dashboard_port(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_kiln(
            "cluster", "start", "--dashboard-port", str(port), env={"KILN_HOME": str(tmp_path)}
        )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: port {port} is in use (another Ray dashboard?); pass --dashboard-port N, or 0 for "
        "a free port"
    )


# ---- the tracking server
# ----------------------------------------------------------------------------


def test_tracking_server_runs_mlflow_with_sqlite_and_served_artifacts_on_loopback(tmp_path):
    from kiln.cluster.tracking_server import tracking_server

    server = tracking_server(port=free_port(), store_dir=tmp_path / "t")
    cmd = server.command()
    assert cmd[:4] == [sys.executable, "-m", "mlflow", "server"]
    opts = dict(zip(cmd, cmd[1:], strict=False))  # each flag -> the word after it
    assert opts["--backend-store-uri"] == f"sqlite:///{tmp_path / 't' / 'mlflow.db'}"
    assert (
        opts["--artifacts-destination"] == str(tmp_path / "t" / "artifacts")
        and "--serve-artifacts" in cmd
    )
    assert opts["--host"] == "127.0.0.1"
    assert server.uri.startswith("http://127.0.0.1:")


def test_tracking_serve_refuses_a_taken_port(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_kiln("tracking", "serve", "--port", str(port), "--dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is in use; pass another --port"
    ]


# ---- process sessions
# -------------------------------------------------------------------------------


def test_stop_session_stops_every_process_of_the_session_and_nothing_else():
    # A leader that ignores SIGTERM, with a child: both must go; a process outside the session must
    # stay.
    leader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, subprocess, sys, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
            "time.sleep(300)",
        ],
        start_new_session=True,
    )
    outsider = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True
    )
    try:

        def both() -> list[int] | None:
            members = session_members(leader.pid)
            return members if len(members) == 2 else None

        members = wait_until(both, 30, "the leader and its child")
        killed = stop_session(leader.pid, None, timeout=1.0)
        assert sorted(killed) == sorted(members)
        # stop_session returns once the processes have exited, not once SIGKILL was sent: the child
        # (re-parented away from the leader, reaped by nobody here) is no longer running even
        # before this test reaps the leader.
        assert not [pid for pid in members if is_running(pid)]
        leader.wait(timeout=10)
        assert session_members(leader.pid) == []
        assert is_running(outsider.pid)
    finally:
        outsider.kill()
        outsider.wait()
