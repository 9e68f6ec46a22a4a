"""kiln.local_ray, the one manager of the Ray heads Kiln starts, without starting Ray: process
identity (a reused pid is never signalled) and the state the serve instance records."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kiln.local_ray import RayHead, is_running, start_ticks, stop_session


@pytest.fixture
def sleeper():
    """A process in a session of its own that is not a Ray head."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_pid_recorded_with_another_start_time_is_never_signalled(sleeper):
    started = start_ticks(sleeper.pid)
    assert started is not None and is_running(sleeper.pid, started)
    # The recorded head started at another time: the pid now names someone else's process.
    assert stop_session(sleeper.pid, started + 1, timeout=0.5) == []
    assert is_running(sleeper.pid, started)
    head = RayHead(sleeper.pid, started + 1, "x:1", "http://127.0.0.1:1", "/nonexistent", "-")
    assert not head.is_running()
    head.stop(timeout=0.5)
    assert is_running(sleeper.pid, started)


def test_a_pid_recorded_without_its_start_time_must_be_a_ray_start(sleeper):
    # State files written before Kiln recorded start times: only a `ray start` counts as the head.
    head = RayHead(sleeper.pid, None, "x:1", "http://127.0.0.1:1", "/nonexistent", "-")
    assert not head.is_running()
    head.stop(timeout=0.5)
    assert is_running(sleeper.pid)


def test_the_serve_state_records_the_dashboard_url_of_the_local_instance(tmp_path):
    from kiln.serve.instance import STATE_FILE, LocalRay, ServeState, load_state, save_state

    local = LocalRay(
        pid=1,
        address="127.0.0.1:6379",
        temp_dir="/nonexistent",
        log="-",
        metrics_port=2,
        dashboard_port=8266,
        auth_mode="token",
        started=3,
        dashboard_url="http://127.0.0.1:8266",
    )
    save_state(
        tmp_path,
        ServeState("127.0.0.1:6379", "http://127.0.0.1:8000", "proxy", local_ray=vars(local)),
    )
    state = load_state(tmp_path)
    assert state is not None and state.dashboard_url == "http://127.0.0.1:8266"
    assert state.local() == local
    # A state file from before: no start time, no dashboard URL; the URL follows from the port.
    path = tmp_path / "serve" / STATE_FILE
    raw = json.loads(path.read_text())
    raw.pop("dashboard_url")
    for key in ("started", "dashboard_url"):
        raw["local_ray"].pop(key)
    path.write_text(json.dumps(raw))
    old = load_state(tmp_path)
    assert old is not None and old.dashboard_url == "http://127.0.0.1:8266"
    assert old.local().started is None


def test_picked_ports_are_distinct_bindable_and_outside_the_kernels_ephemeral_range():
    import socket

    from kiln.local_ray import PICKED_PORTS_LOW, ephemeral_ports, free_port, free_port_block

    low, high = ephemeral_ports()
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(PICKED_PORTS_LOW <= p < low for p in ports), (low, sorted(ports)[-3:])
    blocks = [free_port_block(256) for _ in range(3)]
    spans = [set(range(b, b + 256)) for b in blocks]
    assert all(b > high for b in blocks)  # the kernel leaves room above its range here
    assert not (spans[0] & spans[1] or spans[1] & spans[2] or spans[0] & spans[2])
    assert not (set(ports) & spans[0])
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # free indeed


@pytest.mark.slow  # starts a Ray instance of its own (about 10 s)
def test_workers_of_a_local_instance_kiln_starts_run_at_normal_priority_on_one_malloc_arena(
    ray_cluster,
):
    """Ray runs workers at niceness 15 (the session's instance, started without Kiln's settings,
    shows it); Kiln's local instance runs them at 0, as its other processes, and starts them with
    MALLOC_ARENA_MAX=1 in the environment they were started with (/proc/self/environ: glibc reads
    it at start, a variable set later would change nothing)."""
    import os

    import ray

    assert ray.get(ray.remote(lambda: os.nice(0)).remote()) == 15
    script = (
        "import os, ray\n"
        "from kiln.ray_connection import ensure_ray\n"
        "ensure_ray(None, num_cpus=1)\n"
        "def probe():\n"
        "    start_env = open('/proc/self/environ', 'rb').read().split(b'\\0')\n"
        "    return os.nice(0), b'MALLOC_ARENA_MAX=1' in start_env\n"
        "nice, one_arena = ray.get(ray.remote(probe).remote())\n"
        "print('nice', nice)\n"
        "print('one arena', one_arena)\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MALLOC_ARENA_MAX")}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "nice 0" in lines and "one arena True" in lines, out.stdout
