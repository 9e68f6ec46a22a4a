"""Units of the serving path's fault handling: server readiness from Serve's replica states, and
the ingress's own error answer (the HAProxy error file Kiln writes, checked by HAProxy itself)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger, ReplicaState
from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview, DeploymentStatusOverview

from kiln.serve import root_server
from kiln.serve.ingress_stats import IngressCounters, model_counters, parse_show_stat
from kiln.serve.root_server import ControllerUnreachable, RootServer, unanswered


def app(status: ApplicationStatus, *replicas: dict[ReplicaState, int]) -> ApplicationStatusOverview:
    deployments = {
        f"d{i}": DeploymentStatusOverview(
            status=DeploymentStatus.HEALTHY,
            status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED,
            replica_states=states,
            message="",
        )
        for i, states in enumerate(replicas)
    }
    return ApplicationStatusOverview(
        status=status, message="", last_deployed_time_s=0.0, deployments=deployments
    )


def test_an_app_with_one_running_replica_answers_while_serve_replaces_the_other():
    apps = {
        "kiln": app(ApplicationStatus.RUNNING, {ReplicaState.RUNNING: 1}),
        # one of two replicas died: Serve reports the app as not RUNNING while it starts another
        "kiln-a": app(
            ApplicationStatus.DEPLOYING, {ReplicaState.RUNNING: 1, ReplicaState.STARTING: 1}
        ),
        "kiln-b": app(ApplicationStatus.UNHEALTHY, {ReplicaState.RUNNING: 1}),
        # Serve's controller restarted: it attaches again to the replicas that kept running
        "kiln-c": app(ApplicationStatus.RUNNING, {ReplicaState.RECOVERING: 2}),
    }
    assert unanswered(apps, ["kiln", "kiln-a", "kiln-b", "kiln-c"]) == []


def test_an_app_without_a_running_replica_or_not_deployed_does_not_answer():
    apps = {
        "kiln": app(ApplicationStatus.RUNNING, {ReplicaState.RUNNING: 1}),
        "kiln-a": app(ApplicationStatus.DEPLOYING, {ReplicaState.STARTING: 2}),
        "kiln-b": app(ApplicationStatus.DELETING, {ReplicaState.RUNNING: 1}),
        "kiln-c": app(ApplicationStatus.RUNNING),  # no deployment listed
        "kiln-d": app(ApplicationStatus.RUNNING, {ReplicaState.RUNNING: 1}, {}),
    }
    names = ["kiln", "kiln-a", "kiln-b", "kiln-c", "kiln-d", "kiln-e"]
    assert unanswered(apps, names) == ["kiln-a", "kiln-b", "kiln-c", "kiln-d", "kiln-e"]


def test_readiness_keeps_its_last_answer_while_serves_controller_restarts(monkeypatch):
    """Serve's controller dead or restarting: the replicas still answer, so the server stays ready
    on its last answer for CONTROLLER_GONE_S; past that it says it cannot see, and a controller
    back (answering) is believed again at once."""
    clock = [1000.0]
    monkeypatch.setattr(root_server.time, "monotonic", lambda: clock[0])
    answers: list = [{"kiln": app(ApplicationStatus.RUNNING, {ReplicaState.RUNNING: 1})}]

    def status():
        answer = answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    server = RootServer({}, ["kiln"], "test", status=status)
    assert asyncio.run(server.not_ready()) == []
    answers[0] = ControllerUnreachable("ActorDiedError")
    for step in (2.0, 10.0, 29.0):  # asked again every READY_CACHE_S, unanswered each time
        clock[0] = 1000.0 + step
        assert asyncio.run(server.not_ready()) == [], step
    clock[0] = 1000.0 + root_server.CONTROLLER_GONE_S + 1
    assert asyncio.run(server.not_ready()) == [
        "Serve's controller cannot be reached: ActorDiedError"
    ]
    answers[0] = {"kiln": app(ApplicationStatus.DEPLOYING, {ReplicaState.STARTING: 1})}
    clock[0] += 2
    assert asyncio.run(server.not_ready()) == ["kiln"]


def test_readiness_before_serves_controller_ever_answered_is_false():
    def status():
        raise ControllerUnreachable("ActorUnavailableError")

    server = RootServer({}, ["kiln"], "test", status=status)
    assert asyncio.run(server.not_ready()) == [
        "Serve's controller cannot be reached: ActorUnavailableError"
    ]


def test_a_hung_controller_never_holds_readiness_and_is_asked_once_at_a_time(monkeypatch):
    """Serve's controller that never answers (hung, not dead): readiness answers within
    STATUS_TIMEOUT_S that it cannot reach it, the event loop stays free meanwhile, and the next
    question waits on the same unanswered one instead of starting another thread."""
    monkeypatch.setattr(root_server, "STATUS_TIMEOUT_S", 0.2)
    monkeypatch.setattr(root_server, "READY_CACHE_S", 0.0)
    release, asked = threading.Event(), []

    def status():
        asked.append(1)
        release.wait(10)
        return {"kiln": app(ApplicationStatus.RUNNING, {ReplicaState.RUNNING: 1})}

    server = RootServer({}, ["kiln"], "test", status=status)

    async def scenario():
        ticks = 0

        async def ticker():  # runs only while the event loop is free
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.ensure_future(ticker())
        first = await server.not_ready()
        second = await server.not_ready()
        questions = len(asked)
        release.set()
        third = await server.not_ready()
        task.cancel()
        return first, second, third, ticks, questions

    first, second, third, ticks, questions = asyncio.run(scenario())
    gone = ["Serve's controller cannot be reached: no answer in 0.2 s"]
    assert (first, second) == (gone, gone)
    assert third == []  # the controller answered the question it had: believed at once
    assert questions == 1  # one thread for the hung question, not one per call
    assert ticks >= 20  # the loop ran on while both calls waited (0.4 s at 10 ms a tick)


@pytest.fixture
def kiln_error_file(tmp_path, monkeypatch):
    """The HAProxy template after Kiln's hook, as the HAProxy manager of a Kiln instance sees it
    (its config folder under tmp_path); yields (template, error file path)."""
    import importlib

    from ray.serve._private import constants, haproxy_templates

    from kiln.compat import (
        HAPROXY_ERRORFILE_LINES,
        KILN_ERROR_FILE,
        haproxy_error_file_env,
        use_kiln_haproxy_error_file,
    )
    from kiln.serve.http import unavailable_response

    monkeypatch.setenv("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", str(tmp_path / "haproxy.cfg"))
    for name, value in haproxy_error_file_env(unavailable_response()).items():
        monkeypatch.setenv(name, value)
    importlib.reload(constants)  # Ray reads its variables at import, as in a fresh worker
    try:
        original = haproxy_templates.HAPROXY_CONFIG_TEMPLATE
        for line in HAPROXY_ERRORFILE_LINES:
            assert line in original  # Ray 2.60 still answers 502/503/504 with its one file
        patched = use_kiln_haproxy_error_file(original)
        assert use_kiln_haproxy_error_file(patched) == patched  # idempotent
        yield patched, tmp_path / KILN_ERROR_FILE
    finally:
        monkeypatch.undo()
        importlib.reload(constants)


def test_the_ingress_answers_its_own_errors_with_kilns_json_503(kiln_error_file):
    import json

    import jinja2

    template, path = kiln_error_file
    jinja2.Environment().parse(template)  # still a template
    for code in (502, 503, 504):
        assert f"errorfile {code} {path}" in template
    raw = path.read_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Retry-After"]) >= 1 and int(headers["Content-Length"]) == len(body)
    assert "replica" in json.loads(body)["error"]


def test_haproxy_itself_accepts_the_error_file(kiln_error_file, tmp_path):
    """HAProxy parses error files when it loads its config: check it as Serve's HAProxy would
    (``-c`` only checks the config: nothing binds)."""
    from ray.serve._private.haproxy import get_haproxy_binary

    _, path = kiln_error_file
    config = tmp_path / "check.cfg"
    config.write_text(
        "defaults\n  mode http\n  timeout connect 1s\n  timeout client 1s\n  timeout server 1s\n"
        "  retry-on conn-failure empty-response\n  retries 1\n  option redispatch 1\n"
        + "".join(f"  errorfile {code} {path}\n" for code in (502, 503, 504))
        + "frontend f\n  bind 127.0.0.1:8080\n  default_backend b\n"
        "backend b\n  server s 127.0.0.1:9\n"
    )
    check = subprocess.run(
        [get_haproxy_binary(), "-c", "-f", str(config)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_port_a_listener_found_taken_is_read_from_haproxys_and_uvicorns_errors():
    from kiln.serve.lifecycle import taken_port
    from test_errors import HAPROXY_CRASH

    assert taken_port(HAPROXY_CRASH) == 38587
    uvicorn = "[Errno 98] error while attempting to bind on address ('127.0.0.1', 41002): "
    assert taken_port(uvicorn + "address already in use") == 41002
    assert taken_port("OSError: [Errno 98] Address already in use") == -1
    assert taken_port("RuntimeError: HAProxy did not take over the admin socket") is None


# ``show stat`` as Ray 2.60's HAProxy (2.8) answered it in tests/test_serve_faults.py: the header,
# the backends of one model (http, grpc) and of the root app, and a server row
SHOW_STAT = (Path(__file__).parent / "haproxy_show_stat.csv").read_text()


def _with(stat: str, backend: str, **counts: int) -> str:
    """``stat`` with the named counters of ``backend``'s BACKEND row set to ``counts``."""
    lines = stat.splitlines()
    header = lines[0][2:].split(",")
    for i, line in enumerate(lines[1:], 1):
        fields = line.split(",")
        if fields[:2] == [backend, "BACKEND"]:
            for name, value in counts.items():
                fields[header.index(name)] = str(value)
            lines[i] = ",".join(fields)
    return "\n".join(lines) + "\n"


def test_show_stat_gives_each_backends_counters():
    stats = parse_show_stat(_with(SHOW_STAT, "http-kiln-digits", wretr=7, wredis=3, hrsp_5xx=2))
    assert set(stats) == {"http-kiln-digits", "grpc-kiln-digits", "http-kiln"}  # no server rows
    assert stats["http-kiln-digits"] == IngressCounters(
        requests=459, retries=7, redispatches=3, errors_5xx=2
    )
    assert stats["grpc-kiln-digits"] == IngressCounters()
    assert parse_show_stat("") == {} and parse_show_stat("Unknown command\n") == {}


def test_counters_since_an_earlier_reading_and_across_a_reload():
    before = IngressCounters(requests=100, retries=2, redispatches=1, errors_5xx=0)
    now = IngressCounters(requests=180, retries=9, redispatches=5, errors_5xx=1)
    assert now.since(before) == IngressCounters(80, 7, 4, 1)
    assert now.since(None) == now
    reloaded = IngressCounters(requests=12, retries=3)  # a new HAProxy process counts from zero
    assert reloaded.since(now) == reloaded


def test_a_models_counters_sum_its_backends_over_every_nodes_haproxy(tmp_path):
    """Two nodes' HAProxy admin sockets under the instance's HAProxy folder, answering ``show
    stat`` over a real unix socket: the model's http and grpc backends of both are summed; a
    folder without a live socket is skipped; another model's backends are not counted."""
    answers = {
        "node-a": _with(SHOW_STAT, "grpc-kiln-digits", stot=10, wretr=1),
        "node-b": _with(SHOW_STAT, "http-kiln-digits", stot=41, wretr=4, wredis=4),
    }
    servers = []
    for node, answer in answers.items():
        (tmp_path / node).mkdir()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(tmp_path / node / "admin.sock"))
        server.listen(1)
        servers.append(server)

        def serve(server=server, answer=answer):
            conn, _ = server.accept()
            with conn:
                assert conn.recv(100) == b"show stat\n"
                conn.sendall(answer.encode())

        threading.Thread(target=serve, daemon=True).start()
    (tmp_path / "node-gone").mkdir()
    (tmp_path / "node-gone" / "admin.sock").write_text("")  # not a socket: refused
    try:
        total = model_counters(tmp_path, "digits")
    finally:
        for server in servers:
            server.close()
    assert total == IngressCounters(requests=459 + 10 + 41, retries=5, redispatches=4)
    assert model_counters(tmp_path / "none", "digits") is None
