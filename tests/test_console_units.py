"""The console's pure parts, in-process and without Ray: Prometheus snapshots to series, the
rollout panel, and the HTTP rules of ``/console/`` that need no cluster (the API key, the key
form, read-only actions, the packaged files)."""

from __future__ import annotations

import asyncio
import json

import pytest

from kiln.console.metrics import (
    MetricsHistory,
    VersionCounters,
    bucket_bound,
    interval_point,
    parse_snapshot,
    quantile,
)
from kiln.console.server import COOKIE, ConsoleServer, static_files
from kiln.console.state import gate_rows, rollout_view
from kiln.serve.http import key_digest

PROM = """\
# HELP ray_kiln_requests_total Inference requests answered, per model version.
# TYPE ray_kiln_requests_total counter
ray_kiln_requests_total{{model="m",model_version="1",endpoint="infer",replica="a"}} {r1}
ray_kiln_requests_total{{model="m",model_version="1",endpoint="infer",replica="b"}} {r2}
# TYPE ray_kiln_request_errors_total counter
ray_kiln_request_errors_total{{model="m",model_version="1",endpoint="infer",code="500"}} {e}
# TYPE ray_kiln_request_latency_ms histogram
ray_kiln_request_latency_ms_bucket{{model="m",model_version="1",endpoint="infer",le="5.0"}} {l5}
ray_kiln_request_latency_ms_bucket{{model="m",model_version="1",endpoint="infer",le="10.0"}} {l10}
ray_kiln_request_latency_ms_bucket{{model="m",model_version="1",endpoint="infer",le="+Inf"}} {l10}
ray_kiln_request_latency_ms_count{{model="m",model_version="1",endpoint="infer"}} {l10}
ray_kiln_request_latency_ms_sum{{model="m",model_version="1",endpoint="infer"}} 1.0
# TYPE ray_kiln_batch_size histogram
ray_kiln_batch_size_bucket{{model="m",model_version="1",le="1.0"}} {b1}
ray_kiln_batch_size_bucket{{model="m",model_version="1",le="2.0"}} {b2}
ray_kiln_batch_size_bucket{{model="m",model_version="1",le="+Inf"}} {b2}
ray_kiln_batch_size_sum{{model="m",model_version="1"}} 0.5
ray_kiln_batch_size_count{{model="m",model_version="1"}} {b2}
"""


def snapshot(**values):
    base = dict(r1=0, r2=0, e=0, l5=0, l10=0, b1=0, b2=0)
    return parse_snapshot(PROM.format(**{**base, **values}))


def test_snapshots_sum_replicas_and_give_rates_and_quantiles():
    old = snapshot()
    new = snapshot(r1=60, r2=40, e=5, l5=50, l10=100, b1=10, b2=40)
    assert new[("m", "1")].requests == 100 and new[("m", "1")].errors == 5
    point = interval_point(110.0, 10.0, old[("m", "1")], new[("m", "1")])
    assert point["rate"] == pytest.approx(10.0)
    assert point["error_rate"] == pytest.approx(0.05)
    assert point["p50_ms"] == pytest.approx(5.0)  # rank 50 ends the first bucket
    assert point["p99_ms"] == pytest.approx(5.0 + 5.0 * 49 / 50)
    assert point["batch"] == 2.0  # 30 of 40 calls had 2 rows (Ray's _sum is not used)
    idle = interval_point(120.0, 10.0, new[("m", "1")], new[("m", "1")])
    assert idle["rate"] == 0 and idle["p99_ms"] is None and idle["batch"] is None


def test_quantiles_of_edge_histograms():
    assert quantile(0.5, {}) is None
    assert quantile(0.5, {1.0: 0, float("inf"): 0}) is None
    assert quantile(0.99, {1.0: 0, 2.0: 0, float("inf"): 10}) == 2.0  # all above the last bound
    assert bucket_bound(0.5, {1.0: 10, 2.0: 10, float("inf"): 10}) == 1.0


def test_history_keeps_changed_snapshots_and_builds_series():
    h = MetricsHistory(keep=3, idle_s=30)
    a, b = snapshot(r1=1, l10=1, l5=1), snapshot(r1=11, l5=11, l10=11)
    assert h.add(a, now=0.0) and not h.add(a, now=1.0)  # the exporter has not exported yet
    assert h.add(b, now=2.0)
    assert h.add(b, now=40.0)  # unchanged but old: an idle interval
    series = h.series()[("m", "1")]
    assert [p["t"] for p in series] == [2.0, 40.0]
    assert series[0]["rate"] == pytest.approx(5.0) and series[1]["rate"] == 0
    for t in (50.0, 60.0, 70.0):
        h.add(snapshot(r1=int(t), l5=int(t), l10=int(t)), now=t)
    assert len(h.snapshots) == 3
    assert VersionCounters() == VersionCounters()


def test_gate_rows_split_threshold_and_say_the_result_in_words():
    rows = gate_rows(
        {
            "error_rate<0.01": {"value": 0.0, "ok": True},
            "p99_ms<200": {"value": 250.0, "ok": False},
            "drift<0.3": {"value": None, "ok": None},
        }
    )
    assert [(r["signal"], r["op"], r["threshold"], r["result"]) for r in rows] == [
        ("error_rate", "<", 0.01, "PASS"),
        ("p99_ms", "<", 200.0, "FAIL"),
        ("drift", "<", 0.3, "NO DATA"),
    ]


def test_rollout_view_takes_the_steps_since_the_last_start():
    record = {"phase": "running", "stable": "1", "candidate": "2", "steps": [20.0, 50.0]}
    entries = [
        {"time": 1, "decision": "start", "weights": {"1": 100.0}, "gates": {}},
        {"time": 2, "decision": "rollback", "weights": {"1": 100.0}, "trigger": "user"},
        {"time": 3, "decision": "start", "weights": {"1": 100.0, "2": 0.0}},
        {"time": 4, "decision": "continue", "weights": {"1": 80.0, "2": 20.0},
         "gates": {"error_rate<0.01": {"value": 0.0, "ok": True}}},
        {"time": 5, "decision": "advance", "weights": {"1": 50.0, "2": 50.0}},
    ]  # fmt: skip
    view = rollout_view({"record": record, "live": True, "gates": {}}, entries)
    assert view["active"] and view["planned"] == [20.0, 50.0]
    assert [(w["t"], w["weight"]) for w in view["weights"]] == [(3, 0.0), (4, 20.0), (5, 50.0)]
    assert [i["t"] for i in view["intervals"]] == [4]
    assert [f["decision"] for f in view["finished"]] == ["rollback"]


def test_the_planned_schedule_lays_out_the_steps_still_to_come_then_the_promotion():
    from kiln.console.state import planned_schedule

    record = {
        "phase": "running",
        "steps": [10.0, 25.0, 50.0],
        "step": 1,
        "step_started_at": 100.0,
        "bake_s": 30.0,
        "baked_s": 10.0,
    }
    # this step from its start; the next once its 20 s still to bake are done; 100 after the last
    assert planned_schedule(record, now=120.0) == [
        {"t": 100.0, "weight": 25.0},
        {"t": 140.0, "weight": 50.0},
        {"t": 170.0, "weight": 100.0},
    ]
    preparing = {**record, "step": -1, "step_started_at": 0.0, "baked_s": 0.0}
    assert [p["weight"] for p in planned_schedule(preparing, now=5.0)] == [10.0, 25.0, 50.0, 100.0]
    assert planned_schedule({**record, "phase": "promoted"}, now=120.0) == []
    view = rollout_view({"record": record, "live": True}, [], now=120.0)
    assert [p["weight"] for p in view["schedule"]] == [25.0, 50.0, 100.0]


# --- HTTP rules, no cluster ----------------------------------------------------------------------


def request(path: str, method: str = "GET", headers=None, body: bytes = b""):
    from starlette.requests import Request

    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "headers": raw,
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
    }
    return Request(scope, receive)


def call(server, *args, **kwargs):
    return asyncio.run(server(request(*args, **kwargs)))


def test_with_a_key_everything_but_the_form_needs_it(tmp_path):
    server = ConsoleServer(str(tmp_path), key_digest("k"))
    for path in ("/console/", "/console/api/state", "/console/static/console.js"):
        resp = call(server, path)
        assert resp.status_code == 401 and b"missing API key" in resp.body
    assert call(server, "/console/", headers={"X-API-Key": "x"}).status_code == 403
    page = call(server, "/console/", headers={"Accept": "text/html"})
    assert page.status_code == 401 and b'name="key"' in page.body
    assert call(server, "/console/static/console.css").status_code == 200
    ok = call(server, "/console/static/console.js", headers={"Authorization": "Bearer k"})
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/javascript")
    assert "default-src 'self'" in ok.headers["content-security-policy"]
    with_cookie = call(server, "/console/", headers={"Cookie": f"{COOKIE}=k"})
    assert with_cookie.status_code == 200 and b"console.js" in with_cookie.body
    assert call(server, "/console").status_code == 308
    assert call(server, "/console/static/../server.py", headers={"X-API-Key": "k"}).status_code == (
        404
    )


def test_the_key_form_sets_a_strict_cookie_only_for_the_right_key(tmp_path):
    server = ConsoleServer(str(tmp_path), key_digest("k"))
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    wrong = call(server, "/console/login", "POST", form, b"key=nope")
    assert wrong.status_code == 403 and b"wrong API key" in wrong.body
    right = call(server, "/console/login", "POST", form, b"key=k")
    assert right.status_code == 303 and right.headers["location"] == "/console/"
    cookie = right.headers["set-cookie"]
    assert (
        cookie.startswith(f"{COOKIE}=k;") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    )


def test_without_a_key_set_the_console_is_read_only(tmp_path):
    server = ConsoleServer(str(tmp_path), None)
    assert call(server, "/console/").status_code == 200
    body = json.dumps({"model": "m", "action": "rollback"}).encode()
    resp = call(server, "/console/api/action", "POST", {"Content-Type": "application/json"}, body)
    assert resp.status_code == 403 and b"need the server's API key" in resp.body


def test_a_page_gets_the_last_gathering_at_once_and_a_newer_one_follows(tmp_path):
    """The page's JSON waits only for a first gathering (or one over FRESH_S old), which the page
    itself starts; a younger one is answered at once while the next is gathered in the
    background, one at a time."""
    from kiln.console import server as module

    server = ConsoleServer(str(tmp_path), None)
    gathered: list[int] = []

    async def gather(actions: bool) -> dict:  # the page's JSON, numbered (no cluster here)
        gathered.append(len(gathered) + 1)
        return {"n": gathered[-1]}

    server.data.gather = gather  # type: ignore[method-assign]

    async def scenario() -> list[int]:
        page = await server(request("/console/"))  # the page: its JSON gathered meanwhile
        assert page.status_code == 200 and server._gathering is not None
        seen = []
        for age in (None, 0.0, module.STATE_CACHE_S + 1, module.FRESH_S + 1):
            if age is not None and server._cached is not None:
                server._cached = (server._cached[0] - age, server._cached[1])
            resp = await server(request("/console/api/state"))
            seen.append(json.loads(resp.body)["n"])
            if server._gathering is not None:
                await server._gathering  # the background one, before the next step
        return seen

    # first: waited for; young: the same; older than STATE_CACHE_S: the same at once, the next
    # gathered behind it; older than FRESH_S: a new one waited for
    assert asyncio.run(scenario()) == [1, 1, 1, 3]
    assert gathered == [1, 2, 3]


def test_actions_refuse_other_origins_and_unknown_actions(tmp_path):
    server = ConsoleServer(str(tmp_path), key_digest("k"))
    key = {"X-API-Key": "k", "Host": "127.0.0.1:8000"}
    body = json.dumps({"model": "m", "action": "rollback"}).encode()
    other = call(server, "/console/api/action", "POST", {**key, "Origin": "http://evil"}, body)
    assert other.status_code == 403
    bad = json.dumps({"model": "m", "action": "delete"}).encode()
    assert call(server, "/console/api/action", "POST", key, bad).status_code == 400


def test_every_packaged_file_is_local_and_uplot_is_recorded():
    files = static_files()
    assert {"index.html", "console.js", "console.css", "vendor/uplot/uPlot.iife.min.js"} <= set(
        files
    )
    version = json.loads(files["vendor/uplot/VERSION.json"].read_text())
    assert version["name"] == "uplot" and version["license"] == "MIT"
    assert "vendor/uplot/LICENSE" in files
    import hashlib

    for name, digest in version["files"].items():
        assert hashlib.sha256(files[f"vendor/uplot/{name}"].read_bytes()).hexdigest() == digest
    for name in ("index.html", "console.js", "console.css"):
        text = files[name].read_text()
        assert "http://" not in text and "https://" not in text, name


def test_kiln_console_says_plainly_when_nothing_is_served(tmp_path):
    from conftest import run_kiln

    proc = run_kiln("console", "--print", "--run-dir", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: nothing is being served from")
    proc = run_kiln("console", "--url", "http://127.0.0.1:8000", "--print", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "url": "http://127.0.0.1:8000/console/",
        "opened": False,
    }


def test_a_read_only_page_shows_no_buttons_in_a_real_browser(tmp_path):
    """With no API key set, the page renders a rollout without its buttons (Chromium; the page's
    requests are answered in-process by the console's own handler, whose gathered state is built
    by ``rollout_view`` from a record: no cluster)."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if chromium is None or sync_playwright is None:
        pytest.skip("needs Debian's chromium and Playwright for Python (`make install`)")
    record = {"phase": "running", "stable": "1", "candidate": "2", "steps": [20.0],
              "strategy": "canary", "step": 0, "weight": 20.0, "baked_s": 0.0, "bake_s": 60,
              "shadow": 0.0, "reason": ""}  # fmt: skip
    entries = [{"time": 1.0, "decision": "start", "weights": {"1": 100.0}, "trigger": "user"}]
    version = {"uri": "", "facts": {}, "series": [], "latest": None, "monitor": None}
    state = {
        "time": 2.0,
        "url": "http://127.0.0.1:9",
        "actions": False,
        "errors": [],
        "models": [
            {
                "name": "m",
                "app": {"status": "RUNNING", "replicas": {"RUNNING": 1}},
                "versions": [
                    {**version, "version": "1", "roles": ["default", "stable"]},
                    {**version, "version": "2", "roles": ["candidate"]},
                ],
                "rollout": rollout_view({"record": record, "live": True, "gates": {}}, entries),
                "monitor_scope": None,
            }
        ],
    }
    server = ConsoleServer(str(tmp_path), None)

    async def gather(actions: bool) -> dict:
        return {**state, "actions": actions}

    server.data.gather = gather  # type: ignore[method-assign]

    def answer(route):
        req = route.request
        path = req.url.split("127.0.0.1:9", 1)[1].split("?", 1)[0]
        # Playwright's sync API runs an event loop in this thread: the handler runs in another
        with ThreadPoolExecutor(1) as pool:
            resp = pool.submit(call, server, path, req.method, dict(req.headers)).result()
        route.fulfill(status=resp.status_code, headers=dict(resp.headers), body=resp.body)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.route("http://127.0.0.1:9/**", answer)
        page.goto("http://127.0.0.1:9/console/")
        page.wait_for_selector('[data-testid="read-only"]', timeout=30_000)
        assert page.query_selector("button[data-action]") is None
        assert page.inner_text('[data-testid="weights-now"]') == "Weights now: v1 80% / v2 20%"
        assert page.inner_text("#mode") == "read-only"
        browser.close()
    assert errors == []
