"""`kiln serve start` refusing to start on a cluster where Kiln serves nothing yet: replicas that
can never fit, and replicas that find no free CPU before the start timeout. Kept apart from
test_serve_http.py, whose app would make every start here fail with "already serving"."""

# Fixtures imported from served_models by name are redefined as parameters (pytest's way):
from __future__ import annotations

import time

import pytest

from conftest import run_kiln
from kiln.waiting import wait_until
from ray_actors import replica_pids
from served_models import serve_args

pytestmark = pytest.mark.module_seconds(25)


def kiln_apps(address: str) -> list[str]:
    """Kiln's Serve applications with a live replica, from Ray's state API: not this process's
    Serve client, which another module's `kiln serve stop` (it kills Serve's controller) leaves
    holding a dead controller."""
    replicas = [name.split("::", 1)[1] for name in replica_pids(address, "kiln")]
    return sorted({r.split("#")[0] for r in replicas})


@pytest.fixture(autouse=True)
def nothing_served(ray_cluster):
    """These tests start on an idle cluster (no other module's app is running)."""
    assert not kiln_apps(ray_cluster)


def test_start_fails_at_once_when_replicas_cannot_fit(ray_cluster, registry):

    proc = run_kiln(
        *serve_args(
            ray_cluster, registry, registry.uris["fp32-cnn"], "serve.deployment.num_cpus=3"
        ),
        env={"MLFLOW_TRACKING_URI": registry.tracking_uri},
    )
    assert proc.returncode == 2
    assert (
        "error: model 'digits' needs 1 replica(s) of 3 CPU but the cluster's nodes can hold only 0"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert not kiln_apps(ray_cluster)


@pytest.mark.slow  # waits out a start timeout
def test_start_times_out_with_a_clear_message_when_the_cluster_is_busy(ray_cluster, registry):
    """Replicas that fit the cluster but find no free CPU: start fails after its timeout, deploys
    nothing."""
    import ray

    @ray.remote(num_cpus=1.8)
    class Hog:
        def ping(self):
            return True

    hog = Hog.remote()
    ray.get(hog.ping.remote())
    try:
        started = time.monotonic()
        proc = run_kiln(
            *serve_args(
                ray_cluster,
                registry,
                registry.uris["fp32-cnn"],
                "--timeout",
                "5",
                "--port",
                "0",  # Kiln picks it (and picks again if it is taken before Serve binds it)
            ),
            env={"MLFLOW_TRACKING_URI": registry.tracking_uri},
        )
        elapsed = time.monotonic() - started
    finally:
        ray.kill(hog)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    # the model's app is named with what it waits for; the root app (tiny) may be still starting
    # on a loaded machine, and is then named too
    assert line.startswith("error: the models were not running after 5s: ")
    assert "'kiln-digits' (1 replica(s) x 0.5 CPU)" in line
    assert "CPU free" in line
    assert elapsed < 120
    wait_until(
        lambda: not kiln_apps(ray_cluster), 60, "the failed start's applications to be removed"
    )


def test_start_on_a_port_something_listens_on_fails_in_one_line_naming_it(ray_cluster, registry):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_kiln(
            *serve_args(ray_cluster, registry, registry.uris["fp32-cnn"], "--port", str(port)),
            env={"MLFLOW_TRACKING_URI": registry.tracking_uri},
        )
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: port {port} is in use on this machine"), line
    assert "Traceback" not in proc.stderr
    assert not kiln_apps(ray_cluster)
