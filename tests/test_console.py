"""The Kiln console in a real headless Chromium (Debian's ``chromium``, driven by Playwright for
Python), against one real ``kiln serve`` app on the session's Ray instance, behind an API key.

The registry is this module's own (its rollouts and aliases must not move the versions other
modules expect): the session's trained digits CNN registered twice, as v1 and v2. Each test that
needs a rollout starts a fresh linear ramp v1 -> v2 (20%, then 50%) whose gates hold while no
traffic comes, so the test decides when a step happens (by sending traffic). Screenshots of the
console under the canary and during drift are written to ``tests/artifacts/console/`` (the README
shows copies of them), with ``load.json``: the page's time to first data, recorded, never asserted.
The app's alert webhook URL carries a planted secret: with the API key, neither shows in any answer,
CLI output or replica log. Skipped, with the reason, only where no Chromium or Playwright exists.
"""

from __future__ import annotations

import json
import shutil
import threading
import urllib.parse

import numpy as np
import pytest
import requests

from conftest import REPO, last_json, run_kiln
from kiln.waiting import wait_until
from ray_actors import replica_pids
from served_models import digits_raw, register_artifact

pytestmark = [pytest.mark.slow, pytest.mark.module_seconds(45)]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MODEL = "digits"
KEY_ENV = "KILN_CONSOLE_TEST_KEY"
KEY = "console-test-key-4711"
SHOTS = REPO / "tests" / "artifacts" / "console"
WINDOW = 100
TOKEN = "c0nsole-w3bhook-t0ken"  # planted in the alert webhook's URL: must show nowhere
WEBHOOK = f"https://alerts:{TOKEN}@127.0.0.1:9/hook?token={TOKEN}"  # refused at once
IMAGES = digits_raw(400)  # varied enough not to drift by itself


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    return sync_playwright


if CHROMIUM is None or _playwright() is None:
    pytest.skip(
        "the console's browser tests need Debian's chromium and Playwright for Python "
        f"(chromium: {CHROMIUM or 'not found'}; playwright: "
        f"{'installed' if _playwright() else 'not installed'}); `make install` installs both",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def console_registry(registry, tmp_path_factory):
    """Two versions of 'digits' in this module's own store: the session's fp32 CNN, twice."""
    from kiln import tracking as trk

    run_dir = tmp_path_factory.mktemp("console-registry")
    source = trk.resolve_model_dir(registry.uris["fp32-cnn"], registry.tracking_uri)
    uris = []
    for _ in range(2):
        copy = run_dir / f"artifact-{len(uris)}"
        shutil.copytree(source, copy)
        uris.append(register_artifact(run_dir, MODEL, copy, "fp32"))
    return {"run_dir": run_dir, "tracking_uri": trk.default_tracking_uri(run_dir), "uris": uris}


@pytest.fixture(scope="module")
def served(ray_cluster, console_registry, tmp_path_factory):
    """v1 served behind an API key, with a small monitoring window (drift shows after ~100 rows)
    and an alert webhook whose URL carries a secret (nothing listens there)."""
    serve_dir = tmp_path_factory.mktemp("console-serving")
    env = {"MLFLOW_TRACKING_URI": console_registry["tracking_uri"], KEY_ENV: KEY}
    proc = run_kiln(
        "serve",
        "start",
        console_registry["uris"][0],
        "serve.deployment.num_cpus=0.5",
        f"serve.monitor.window={WINDOW}",
        "serve.monitor.min_rows=60",
        "serve.monitor.eval_every=20",
        f"serve.monitor.webhook_url={WEBHOOK}",
        "--api-key-env",
        KEY_ENV,
        "--port",
        "0",  # Kiln picks it (and picks again if it is taken before Serve binds it)
        "--address",
        ray_cluster,
        "--run-dir",
        str(serve_dir),
        "--json",
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    info = last_json(proc.stdout)
    info["run_dir"] = serve_dir
    yield info
    run_kiln("serve", "stop", "--address", ray_cluster, "--run-dir", str(serve_dir), timeout=300)


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _playwright()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """A console page in its own browser context, with its console messages and network log."""

    def __init__(self, browser, url: str, key: str | None):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.response = self.page.goto(f"{url}/console/?poll=500")
        if key is not None:  # the key form, as a person would use it
            self.page.fill("#key", key)
            self.page.click("button[type=submit]")
            self.page.wait_for_selector(f'[data-model="{MODEL}"]', timeout=60_000)
            self.errors.clear()  # the refused first load (401) is expected, and logged as such
        if key is not None:  # recorded, never asserted: how long the page took to show data
            self.loaded_ms = self.page.evaluate(
                "performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd"
            )

    def text(self, selector: str) -> str:
        return self.page.inner_text(selector)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def open_page(browser, served):
    pages: list[Page] = []

    def open_(key: str | None = KEY) -> Page:
        pages.append(Page(browser, served["url"], key))
        return pages[-1]

    yield open_
    for p in pages:
        p.close()


def infer_body(images: np.ndarray) -> str:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "UINT8",
                    "shape": list(images.shape),
                    "data": images.ravel().tolist(),
                }
            ]
        }
    )


def send(
    url: str,
    n: int,
    path: str = f"/v2/models/{MODEL}/infer",
    noise: bool = False,
    first: int = 0,
) -> None:
    """``n`` requests of one image each (digits from the ``first``-th on, or uniform noise), with
    the key."""
    rng = np.random.default_rng(0)
    with requests.Session() as s:
        for i in range(n):
            image = (
                rng.integers(0, 256, (1, 1, 8, 8)).astype(np.uint8)
                if noise
                else IMAGES[(first + i) % len(IMAGES)][None]
            )
            resp = s.post(url + path, data=infer_body(image), headers={"X-API-Key": KEY})
            assert resp.status_code == 200, resp.text


class Traffic:
    """Requests sent in a background thread until stopped."""

    def __init__(self, url: str):
        self.url, self.stop_flag = url, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        sent = 0
        while not self.stop_flag.is_set():
            send(self.url, 5, first=sent)
            sent += 5

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag.set()
        self.thread.join(timeout=60)


def record(served):
    from kiln.rollout.core.store import RolloutStore

    return RolloutStore(served["run_dir"], MODEL).load()


def wait_record(served, condition, what: str, timeout: float = 90.0):
    return wait_until(
        lambda: (r := record(served)) is not None and condition(r) and r, timeout, what
    )


@pytest.fixture
def ramp(served, console_registry):
    """A fresh linear rollout v1 -> v2 at its first step (20%), running; one left active by another
    test is rolled back first. Its gates hold without traffic: steps happen only under traffic."""
    from kiln.rollout.control.api import rollout_command, start_rollout
    from kiln.rollout.core.spec import RolloutOptions
    from kiln.rollout.core.store import FINISHED

    current = record(served)
    if current is not None and current.active:
        rollout_command(served["run_dir"], None, MODEL, "rollback")
        wait_record(served, lambda r: r.phase in FINISHED, "the old rollout to end")
    v2 = console_registry["uris"][1].rsplit("/", 1)[1]
    start_rollout(
        served["run_dir"],
        None,
        MODEL,
        v2,
        "linear",
        RolloutOptions(steps=[20.0, 50.0], bake_s=3.0, interval_s=1.0, gates=["error_rate<0.05"]),
    )
    return wait_record(served, lambda r: r.phase == "running", "the ramp to run")


# --- tests ---------------------------------------------------------------------------------------


def test_serve_start_and_status_print_the_console_url(served, ray_cluster):
    assert served["console_url"] == f"{served['url']}/console/"
    proc = run_kiln(
        "serve", "status", "--address", ray_cluster, "--run-dir", str(served["run_dir"])
    )
    assert proc.returncode == 0 and f"console  {served['console_url']}" in proc.stdout, proc.stderr
    proc = run_kiln("console", "--print", "--run-dir", str(served["run_dir"]), "--json")
    assert proc.returncode == 0, proc.stderr
    assert last_json(proc.stdout) == {"url": served["console_url"], "opened": False}


def test_without_the_key_the_console_is_refused_like_the_api(served, open_page):
    url = served["url"]
    api = requests.post(f"{url}/v2/models/{MODEL}/infer", data=infer_body(IMAGES[:1]))
    for path in ("/console/", "/console/api/state", "/console/static/console.js"):
        resp = requests.get(url + path)
        assert (resp.status_code, resp.json()) == (api.status_code, api.json()), path
    wrong = requests.get(f"{url}/console/api/state", headers={"X-API-Key": "nope"})
    assert wrong.status_code == 403
    action = requests.post(f"{url}/console/api/action", json={"model": MODEL, "action": "rollback"})
    assert action.status_code == 401
    page = open_page(key=None)  # a browser asking for the page gets the refusal and the key form
    assert page.response.status == 401
    assert page.text('[data-testid="refused"]') == api.json()["error"]
    assert page.page.query_selector("button[data-action]") is None
    assert page.page.query_selector(f'[data-model="{MODEL}"]') is None


def test_the_page_follows_a_canary_live(served, console_registry, ramp, open_page):
    v1, v2 = (u.rsplit("/", 1)[1] for u in console_registry["uris"])
    page = open_page()
    p = page.page
    section = f'[data-model="{MODEL}"]'
    p.wait_for_selector(f'{section} [data-testid="gate-row"]', timeout=60_000)
    first_data_ms = float(p.get_attribute("body", "data-first-data"))  # the first render
    # the first data may be a gathering from up to FRESH_S ago (an earlier rollout): this ramp
    # shows once the next one arrives
    p.wait_for_function(
        "([sel, text]) => document.querySelector(sel)?.textContent === text",
        arg=[f'{section} [data-testid="weights-now"]', f"Weights now: v{v1} 80% / v{v2} 20%"],
        timeout=30_000,
    )
    gathered_ms = float(p.get_attribute('[data-testid="updated"]', "data-gathered-ms"))
    # the model, both versions with their roles, the current weights, the gate rows
    assert page.text(f'{section} [data-testid="model-name"]') == MODEL
    assert p.query_selector(f'{section} tr[data-version="{v1}"]') is not None
    assert p.query_selector(f'{section} tr[data-version="{v2}"]') is not None
    assert "candidate" in page.text(f'{section} tr[data-version="{v2}"] [data-field="roles"]')
    assert page.text(f'{section} [data-testid="weights-now"]') == (
        f"Weights now: v{v1} 80% / v{v2} 20%"
    )
    gates = page.text(f'{section} [data-testid="gates"]')
    assert "error_rate<0.05" in gates and ("NO DATA" in gates or "PASS" in gates)
    assert p.query_selector(f'{section} button[data-action="rollback"]') is not None
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS / "load.json").write_text(
        json.dumps(
            {
                "dom_content_loaded_ms": page.loaded_ms,
                "first_data_ms": first_data_ms,
                "state_gathered_ms": gathered_ms,  # the server's side of the last page JSON
            }
        )
    )
    p.evaluate("window.kilnMarker = 'no reload'")  # gone if the page reloads
    chart = f'{section} [data-testid="chart-weights"]'
    points_before = int(p.get_attribute(chart, "data-points"))
    # the plan drawn beside the weights: this step, the next one, then 100% at the promotion
    assert json.loads(p.get_attribute(chart, "data-planned")) == [20, 50, 100]
    assert "planned: 20% from" in page.text(f"{chart} .summary")
    requests_before = page.text(f'{section} tr[data-version="{v2}"] [data-field="requests"]')
    SHOTS.mkdir(parents=True, exist_ok=True)
    # more traffic: the gates pass, the step bakes, the ramp moves to 50%; the traffic stops at
    # once, so the last step holds (its gates have no data) instead of baking on to a promotion
    with Traffic(served["url"]):
        wait_record(served, lambda r: r.weight == 50.0, "the ramp's second step", timeout=120)
    p.wait_for_function(
        "(sel) => document.querySelector(sel).textContent.includes('50%')",
        arg=f'{section} [data-testid="weights-now"]',
        timeout=30_000,
    )
    p.wait_for_function(  # Ray exports the counters every few seconds
        "([sel, before]) => document.querySelector(sel).textContent !== before",
        arg=[f'{section} tr[data-version="{v2}"] [data-field="requests"]', requests_before],
        timeout=60_000,
    )
    p.screenshot(path=str(SHOTS / "console-canary.png"), full_page=True)
    assert page.text(f'{section} [data-testid="weights-now"]') == (
        f"Weights now: v{v1} 50% / v{v2} 50%"
    )
    assert int(p.get_attribute(chart, "data-points")) > points_before
    assert json.loads(p.get_attribute(chart, "data-last")) == [50, 100]  # now, and planned
    assert json.loads(p.get_attribute(chart, "data-planned")) == [50, 100]
    passed = p.query_selector_all(f'{section} [data-testid="interval-row"] [data-result="PASS"]')
    assert passed, "no gate interval shown as PASS"
    assert p.evaluate("window.kilnMarker") == "no reload"
    # laptop width (the viewport's 1280 px): nothing wider than the window, no sideways scrolling
    assert p.evaluate("document.documentElement.scrollWidth") <= 1280
    assert page.errors == []
    hosts = {urllib.parse.urlsplit(u).hostname for u in page.requests}
    assert hosts == {"127.0.0.1"}, page.requests


def test_rollback_from_the_page_ends_the_rollout(served, ramp, open_page):
    page = open_page()
    p = page.page
    section = f'[data-model="{MODEL}"]'
    p.click(f'{section} button[data-action="rollback"]', timeout=60_000)
    ended = wait_record(served, lambda r: r.phase == "rolled_back", "the rollback")
    assert ended.stable == ramp.stable
    p.wait_for_function(
        "(sel) => document.querySelector(sel).textContent === 'rolled_back'",
        arg=f'{section} [data-testid="phase"]',
        timeout=30_000,
    )
    assert p.query_selector(f"{section} button[data-action]") is None  # nothing left to act on
    proc = run_kiln("rollout", "history", MODEL, "--run-dir", str(served["run_dir"]), "--json")
    assert proc.returncode == 0, proc.stderr
    last = last_json(proc.stdout)["entries"][-1]
    assert (last["decision"], last["trigger"]) == ("rollback", "console")
    assert "[console]" in proc.stderr and "rollback" in proc.stderr
    assert page.errors == []


def test_drift_shows_on_the_page(served, console_registry, open_page):
    v1 = console_registry["uris"][0].rsplit("/", 1)[1]
    page = open_page()
    p = page.page
    section = f'[data-model="{MODEL}"]'
    send(served["url"], WINDOW, f"/v2/models/{MODEL}/versions/{v1}/infer", noise=True)
    p.wait_for_selector(
        f'{section} [data-testid="monitor-{v1}"] [data-testid="drift-alert"]', timeout=60_000
    )
    features = page.text(f'{section} [data-testid="features-{v1}"]')
    assert "DRIFT" in features and "input.brightness" in features
    p.wait_for_function(
        "(sel) => Number(document.querySelector(sel).dataset.points) >= 1",
        arg=f'{section} [data-testid="chart-drift"]',
        timeout=30_000,
    )
    SHOTS.mkdir(parents=True, exist_ok=True)
    p.screenshot(path=str(SHOTS / "console-drift.png"), full_page=True)
    assert page.errors == []


def test_model_card_from_the_page(served, console_registry, open_page):
    v1 = console_registry["uris"][0].rsplit("/", 1)[1]
    page = open_page()
    p = page.page
    p.click(f'[data-model="{MODEL}"] button[data-card="{v1}"]', timeout=60_000)
    p.wait_for_selector('[data-testid="card"]', timeout=30_000)
    card = page.text('[data-testid="card"]')
    assert card.startswith(f"# Model card: {MODEL} v{v1}") and "## Lineage" in card
    assert page.errors == []


def replica_logs(address: str) -> str:
    """Everything the model's replicas wrote: their stdout and stderr files (found through
    /proc/PID/fd/1 and 2: this machine runs them) and Ray Serve's log files beside them."""
    from pathlib import Path

    files: set[Path] = set()
    for pid in replica_pids(address).values():
        for fd in (1, 2):
            target = Path(f"/proc/{pid}/fd/{fd}").resolve()
            if target.is_file():
                files.add(target)
                files.update((target.parent / "serve").glob("*.log"))
    assert files, "no replica log files found"
    return "\n".join(p.read_text(errors="replace") for p in sorted(files))


def test_the_window_and_the_secrets_only_with_the_key(served, console_registry, ray_cluster):
    """Raw rows and the training data's statistics (``?window=1``) only with the key; the webhook
    URL's secret and the API key in no answer (monitor, console JSON, `kiln serve status`, `kiln
    monitor status`) and in no replica log, even after the webhook was called and failed."""
    v1 = console_registry["uris"][0].rsplit("/", 1)[1]
    url, monitor = served["url"], f"{served['url']}/v2/models/{MODEL}/monitor"
    assert requests.get(f"{monitor}?window=1").status_code == 401
    send(url, WINDOW, f"/v2/models/{MODEL}/versions/{v1}/infer", noise=True)  # a drift alert
    with_key = requests.get(f"{monitor}?window=1", headers={"X-API-Key": KEY})
    assert with_key.status_code == 200, with_key.text
    status = with_key.json()["versions"][v1]
    assert status["window_rows"]["rows"] and status["reference"]
    logs = wait_until(
        lambda: (
            (text := replica_logs(ray_cluster)) and "webhook https://127.0.0.1:9" in text and text
        ),
        60,
        "the failed webhook call in the replica's log",
    )
    answers = [
        with_key.text,
        requests.get(monitor, headers={"X-API-Key": KEY}).text,
        requests.get(f"{url}/console/api/state", headers={"X-API-Key": KEY}).text,
    ]
    env = {KEY_ENV: KEY}
    for args in (
        ("serve", "status", "--address", ray_cluster),
        ("monitor", "status", MODEL, "--api-key-env", KEY_ENV),
    ):
        proc = run_kiln(*args, "--run-dir", str(served["run_dir"]), "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        answers += [proc.stdout, proc.stderr]
    for text in [*answers, logs]:
        assert TOKEN not in text and KEY not in text
