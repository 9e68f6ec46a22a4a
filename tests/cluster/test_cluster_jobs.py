"""Kiln jobs on a real two-node Ray cluster on this machine, with a real MLflow tracking server.

The module starts everything itself and stops it by pid: a head from ``kiln cluster start`` (``ray
start
--head``, token auth on, 1 CPU and the custom resource ``kiln_head``), a second node from ``ray
start
--address`` (1 CPU, ``kiln_node2``) in a session the test owns, and ``kiln tracking serve``. Every
process runs with HOME pointing to a temp dir, so the Ray auth token they create and read never
touches the user's ``~/.ray/auth_token``. Both nodes use the loopback address 127.0.0.2 (Ray turns
127.0.0.1 into the machine's outside address).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, kiln_env, last_json, run_kiln
from kiln.cluster.local import cluster_nodes
from kiln.local_ray import free_port, is_running, session_members, start_ticks, stop_session
from kiln.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.module_seconds(110)]

CONFIG = "configs/train/digits_cnn.yaml"
# Tiny, and one worker per node: each node offers 1 CPU and each worker takes 1.
TINY = [
    "model.width=8",
    "train.epochs=2",
    "train.workers=2",
    "train.cpus_per_worker=1",
    "train.batch_size=128",
]
NODE_IP = "127.0.0.2"
RAY = str(Path(sys.executable).parent / "ray")


@dataclass
class Cluster:
    address: str  # Jobs API
    gcs_address: str
    head_pid: int
    tracking_uri: str
    env: dict[str, str]  # what a user's shell on this machine has: HOME with the cluster's token
    node2: subprocess.Popen
    node_resources: dict[str, set[str]]  # node id -> its kiln_* custom resources
    token: str

    def jobs(self):
        """Ray's own Jobs SDK client, in the test process (quicker than a CLI call per poll)."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _status(env) -> dict:
    return last_json(run_kiln("cluster", "status", "--json", env=env, check=True).stdout)


def _stop_owned(proc: subprocess.Popen, grace: float) -> None:
    stop_session(proc.pid, None, timeout=grace)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture(scope="module")
def cluster():
    home = Path(tempfile.mkdtemp(prefix="kiln-home-", dir="/tmp"))
    node2_tmp = tempfile.mkdtemp(
        prefix="kiln-n2-", dir="/tmp"
    )  # its own: two nodes sharing one temp dir race
    env = {
        "HOME": str(home),
        "KILN_HOME": str(home / ".kiln"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3",
        "MLFLOW_TRACKING_URI": "",
    }
    logs = home / "logs"
    logs.mkdir()
    port = free_port()
    tracking = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kiln.cli",
            "tracking",
            "serve",
            "--port",
            str(port),
            "--dir",
            str(home / "tracking"),
        ],
        cwd=REPO,
        env=kiln_env(env),
        stdout=open(logs / "tracking.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    node2 = None
    try:
        started = run_kiln(
            "cluster",
            "start",
            "--num-cpus",
            "1",
            "--resources",
            '{"kiln_head": 1}',
            "--node-ip-address",
            NODE_IP,
            "--dashboard-port",
            "0",
            "--json",
            env=env,
            timeout=240,
        )
        assert started.returncode == 0, started.stderr
        head = last_json(started.stdout)
        assert (
            home / ".ray" / "auth_token"
        ).is_file()  # generated for the head, in the test's HOME
        node2_env = {
            **kiln_env(env),
            "RAY_AUTH_MODE": "token",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }
        node2 = subprocess.Popen(
            [
                RAY,
                "start",
                "--block",
                "--address",
                head["gcs_address"],
                "--node-ip-address",
                NODE_IP,
                "--num-cpus",
                "1",
                "--resources",
                '{"kiln_node2": 1}',
                "--dashboard-agent-listen-port",
                str(free_port()),
                "--temp-dir",
                node2_tmp,
            ],
            env=node2_env,
            stdout=open(logs / "node2.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        token = (home / ".ray" / "auth_token").read_text().strip()

        def two_alive_nodes():
            alive = [
                n
                for n in cluster_nodes(head["dashboard_url"], {"Authorization": f"Bearer {token}"})
                if n.alive
            ]
            return alive if len(alive) == 2 else None

        nodes = wait_until(two_alive_nodes, 180, "two alive nodes", interval=0.5)
        wait_until(lambda: _healthy(f"http://127.0.0.1:{port}/health"), 120, "the tracking server")
        owned = Cluster(
            address=head["dashboard_url"],
            gcs_address=head["gcs_address"],
            head_pid=head["pid"],
            tracking_uri=f"http://127.0.0.1:{port}",
            env=env,
            node2=node2,
            node_resources={
                n.node_id: {k for k in n.resources if k.startswith("kiln_")} for n in nodes
            },
            token=token,
        )
        yield owned
        # Stopping is checked here, after every test of the module, whatever their order (a test
        # that stopped the head would leave nothing to the tests after it).
        _stop_and_check(owned)
    finally:
        run_kiln("cluster", "stop", env=env, timeout=120)
        if node2 is not None:
            _stop_owned(node2, grace=3)  # its head is gone by now: nothing to drain
        _stop_owned(tracking, grace=3)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(node2_tmp, ignore_errors=True)


def _placement(tracking_uri: str, run_id: str, cluster: Cluster) -> list[set[str]]:
    """The custom resources of the node each rank ran on, by rank (from the run's kiln.worker_nodes
    tag)."""
    from kiln import tracking as trk

    run = trk.get_run(tracking_uri, run_id)
    workers = json.loads(run.data.tags[trk.TAG_WORKER_NODES])
    return [cluster.node_resources[w["node_id"]] for w in sorted(workers, key=lambda w: w["rank"])]


def test_kiln_submit_follow_runs_one_worker_per_node_and_registers_the_model(
    cluster,
    ray_cluster,  # the test process reads the data in Ray Data tasks on the session instance
):
    from kiln import tracking as trk
    from kiln.data.dataset import prepare_data
    from kiln.models.predictor import load_predictor
    from kiln.schema import load_config

    proc = run_kiln(
        "submit",
        "train",
        CONFIG,
        *TINY,
        "--address",
        cluster.address,
        "--tracking-uri",
        cluster.tracking_uri,
        "--follow",
        "--json",
        env=cluster.env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json(proc.stdout)
    assert out["status"] == "SUCCEEDED" and out["driver_exit_code"] == 0 and out["error"] is None
    assert out["submission_id"].startswith("kiln-train-")
    assert (
        "val_acc" in proc.stderr
    )  # --follow streamed the job's own progress (to stderr under --json)
    summary = out["summary"]  # the train job's own --json line
    assert summary["tracking_uri"] == cluster.tracking_uri
    assert summary["model_uri"] == f"models:/digits-cnn/{summary['model_version']}"

    # The run is in the tracking server, finished, and its 2 workers ran one on each node.
    run = trk.get_run(cluster.tracking_uri, summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith(
        "mlflow-artifacts:"
    )  # stored through the server, not a shared disk
    placement = _placement(cluster.tracking_uri, summary["run_id"], cluster)
    assert sorted(map(sorted, placement)) == [["kiln_head"], ["kiln_node2"]]

    # The registered model loads on the submitting side, through the server, and scores what the job
    # logged.
    predictor = load_predictor(summary["model_uri"], tracking_uri=cluster.tracking_uri)
    data = prepare_data(load_config(REPO / CONFIG, TINY).data)
    accuracy = float((predictor.logits(data.x_test).argmax(axis=1) == data.y_test).mean())
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-9)
    assert accuracy > 0.3  # 10 classes: well above chance after 2 epochs

    # `kiln jobs status` sees the same job, and its summary.
    status = last_json(
        run_kiln(
            "jobs",
            "status",
            out["submission_id"],
            "--address",
            cluster.address,
            "--json",
            env=cluster.env,
            check=True,
        ).stdout
    )
    assert status["status"] == "SUCCEEDED" and status["summary"]["run_id"] == summary["run_id"]


def test_rays_own_job_submit_runs_the_same_job(cluster):
    from kiln import tracking as trk

    runtime_env = {
        "env_vars": {"MLFLOW_TRACKING_URI": cluster.tracking_uri},
        "excludes": [".git", "runs", "mlruns", "bench/out"],
    }
    env = {**kiln_env(cluster.env), "RAY_AUTH_MODE": "token"}  # how Ray's CLI sends the token
    env.pop(
        "PYTHONPATH"
    )  # nothing of this checkout on the submitting side: only what the job ships
    proc = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            cluster.address,
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            "python",
            "jobs/train.py",
            CONFIG,
            *TINY,
            "experiment.name=digits-ray-cli",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    client = trk.client(cluster.tracking_uri)
    experiment = client.get_experiment_by_name("digits-ray-cli")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert sorted(map(sorted, _placement(cluster.tracking_uri, runs[0].info.run_id, cluster))) == [
        ["kiln_head"],
        ["kiln_node2"],
    ]
    assert (
        trk.model_version_for(cluster.tracking_uri, "models:/digits-ray-cli/1").run_id
        == runs[0].info.run_id
    )


def test_a_job_with_a_bad_config_fails_and_submit_shows_its_error_line(cluster):
    job_id = f"kiln-test-bad-{os.getpid()}"
    proc = run_kiln(
        "submit",
        "train",
        CONFIG,
        *TINY,
        "data.source=no/such/data.parquet",
        "--address",
        cluster.address,
        "--tracking-uri",
        cluster.tracking_uri,
        "--submission-id",
        job_id,
        "--follow",
        env=cluster.env,
        timeout=300,
    )
    assert proc.returncode == 2  # the job's own exit code: a user mistake
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"error: job {job_id} FAILED: data.source: file not found: no/such/data.parquet"
    assert "Traceback" not in proc.stderr
    status = last_json(
        run_kiln(
            "jobs",
            "status",
            job_id,
            "--address",
            cluster.address,
            "--json",
            env=cluster.env,
            check=True,
        ).stdout
    )
    assert status["status"] == "FAILED" and status["driver_exit_code"] == 2
    logs = run_kiln(
        "jobs", "logs", job_id, "--address", cluster.address, env=cluster.env, check=True
    )
    assert (
        logs.stdout.strip().splitlines()[-1]
        == "error: data.source: file not found: no/such/data.parquet"
    )


def test_jobs_stop_stops_a_running_job(cluster):
    job_id = f"kiln-test-stop-{os.getpid()}"
    proc = run_kiln(
        "submit",
        "train",
        CONFIG,
        *TINY,
        "train.epochs=1000",
        "--address",
        cluster.address,
        "--tracking-uri",
        cluster.tracking_uri,
        "--submission-id",
        job_id,
        env=cluster.env,
    )
    assert proc.returncode == 0, proc.stderr
    assert job_id in proc.stdout

    jobs = cluster.jobs()

    def running():
        status = str(jobs.get_job_status(job_id))
        assert status in ("PENDING", "RUNNING"), status
        return status == "RUNNING"

    wait_until(running, 180, "the job to run", interval=0.5)
    stopped = run_kiln(
        "jobs", "stop", job_id, "--address", cluster.address, "--json", env=cluster.env, timeout=180
    )
    assert stopped.returncode == 0, stopped.stderr
    assert last_json(stopped.stdout)["status"] == "STOPPED"
    assert str(jobs.get_job_status(job_id)) == "STOPPED"
    again = run_kiln(
        "submit",
        "train",
        CONFIG,
        "--address",
        cluster.address,
        "--submission-id",
        job_id,
        env=cluster.env,
    )
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: --submission-id {job_id}: the cluster has a job with that id already"
    ]


def test_a_token_protected_cluster_without_the_token_is_one_clear_line(cluster, tmp_path):
    no_token = {**cluster.env, "HOME": str(tmp_path)}  # a user without ~/.ray/auth_token
    proc = run_kiln("submit", "train", CONFIG, *TINY, "--address", cluster.address, env=no_token)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: the cluster at {cluster.address} requires a Ray auth token and none was found: "
        "set "
        "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token (get it on the head "
        "with "
        "'ray get-auth-token')"
    ]
    wrong = run_kiln(
        "jobs", "list", "--address", cluster.address, env={**no_token, "RAY_AUTH_TOKEN": "not-it"}
    )
    assert wrong.returncode == 2
    lines = wrong.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: the cluster at {cluster.address} rejected the Ray auth"
    )
    # The token from the environment works as well as the file.
    ok = run_kiln(
        "jobs",
        "list",
        "--address",
        cluster.address,
        "--json",
        env={**no_token, "RAY_AUTH_TOKEN": cluster.token},
    )
    assert ok.returncode == 0, ok.stderr
    listed = {j["submission_id"]: j for j in last_json(ok.stdout)["jobs"]}
    assert {j["status"] for j in listed.values()} <= {"SUCCEEDED", "FAILED", "STOPPED"}
    for job in listed.values():  # kiln submit records the job kind; Ray's own CLI does not
        assert job["job"] == ("train" if job["submission_id"].startswith("kiln-") else None)


def test_cluster_status_shows_the_head_and_both_nodes(cluster):
    status = _status(cluster.env)
    assert (
        status["running"]
        and status["pid"] == cluster.head_pid
        and status["dashboard_url"] == cluster.address
    )
    assert status["gcs_address"] == cluster.gcs_address and status["gcs_address"].startswith(
        f"{NODE_IP}:"
    )
    assert sorted(
        [k for k in n["resources"] if k.startswith("kiln_")] for n in status["nodes"] if n["alive"]
    ) == [["kiln_head"], ["kiln_node2"]]
    assert len(session_members(cluster.head_pid)) > 3  # gcs_server, raylet, dashboard, ...


def _stop_and_check(cluster: Cluster) -> None:
    """``kiln cluster stop`` stops every process of the head and nothing else (not the node the
    test added, which is the test's to stop); a second stop has nothing to stop."""
    head_processes = session_members(cluster.head_pid)
    assert len(head_processes) > 3  # gcs_server, raylet, dashboard, ...
    node2_started = start_ticks(cluster.node2.pid)
    stopped = run_kiln("cluster", "stop", "--json", env=cluster.env, timeout=120)
    assert stopped.returncode == 0 and last_json(stopped.stdout)["stopped"] is True
    assert not [p for p in head_processes if is_running(p)]
    assert is_running(cluster.node2.pid, node2_started)
    assert _status(cluster.env)["running"] is False
    again = run_kiln("cluster", "stop", env=cluster.env, check=True)
    assert "nothing to stop" in again.stdout
