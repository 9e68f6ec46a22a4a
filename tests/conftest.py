"""Shared fixtures: one real local Ray instance for the session, a real MLflow store, CLI runners.

Ray is started once per session (per pytest-xdist worker under `make test`), by the first test
that asks for it (fixed num_cpus), and shut down at the end of the session; a module that deploys
on it removes what it deployed. CLI tests run ``python -m kiln.cli`` as a user would and pass
``--address`` so that they reuse that instance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform"
if str(PLATFORM) not in sys.path:
    sys.path.insert(0, str(PLATFORM))

from kiln.cli import configure_process  # noqa: E402  (after the path above)

configure_process()  # a Kiln process's environment and logging, before ray or mlflow is imported

# Ray processes the tests start (the session instance, and the local instances `kiln serve start`
# starts) inherit this environment: workers import this checkout's kiln and the test-only model
# factories in tests/ (rollout_models), and Ray exports metrics every 2 s instead of 10 s, which
# keeps the metrics tests short.
TESTS = REPO / "tests"
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(PLATFORM), str(TESTS), os.environ.get("PYTHONPATH")) if p
)
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")

# The served models' fixtures (registry of every variant, built once per session).
pytest_plugins = ["served_models"]


def kiln_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a kiln subprocess: this checkout's package first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PLATFORM), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    # What a test names is all it gets: an address or a tracking store left in this process's
    # environment by an earlier test (mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI) must not
    # redirect a later test's kiln.
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra or {})
    return env


def run_kiln(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``kiln ARGS`` in a subprocess; returns the completed process (text output)."""
    proc = subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args],
        cwd=cwd or REPO,
        env=kiln_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"kiln {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def last_json(stdout: str) -> dict:
    """The JSON object on the last stdout line (under --json, the CLI keeps stdout for it alone,
    file descriptor 1 included: `tests/test_cli_output.py`)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no stdout"
    try:
        value = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise AssertionError(
            f"the last stdout line is not JSON; stdout ends:\n{stdout[-2000:]}"
        ) from None
    assert isinstance(value, dict), f"the last stdout line is not a JSON object: {lines[-1]}"
    return value


# Fixtures that start the session's Ray instance or train the session's models: a test that uses
# one (directly or through another fixture) is marked ``ray`` and left out of `make test-quick`.
_SHARED_HEAVY_FIXTURES = {"ray_cluster", "registry"}


def pytest_itemcollected(item: pytest.Item) -> None:
    """Mark ``ray`` the tests that use a shared heavy fixture, directly or through another one."""
    if _SHARED_HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
        item.add_marker(pytest.mark.ray)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "module_seconds(n): the module's rough wall time on the idle 2-core machine under `make "
        "test`; the longest modules start first (set on modules over about 30 s)",
    )


def _module_seconds(module_items: list[pytest.Item]) -> float:
    marks = [m for item in module_items for m in item.iter_markers("module_seconds")]
    return max((float(m.args[0]) for m in marks), default=0.0)


@pytest.hookimpl(trylast=True)  # after pytest-randomly has shuffled
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules marked ``module_seconds`` run longest first (the others after them, in pytest-
    randomly's order): under `make test` each xdist worker takes a whole module at a time, and a
    long module started last would leave the other worker idle while it finishes.

    Tests marked ``ends_module`` run after the other tests of their module: they stop something
    the module shares (its served app), which every other test would otherwise start again. Both
    are only optimizations: each test passes alone and in any order, and the shared fixtures
    restart what an ``ends_module`` test stopped."""
    by_module: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_module.setdefault(item.nodeid.split("::")[0], []).append(item)
    modules = sorted(by_module.values(), key=_module_seconds, reverse=True)  # stable: ties random
    items[:] = [
        item
        for module_items in modules
        for last in (False, True)
        for item in module_items
        if (item.get_closest_marker("ends_module") is not None) == last
    ]


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under ``--dist loadfile``: xdist's module-at-a-time scheduling, but in the collection's
    module order (longest first, above; xdist would sort modules by their number of tests, which
    puts a long module of one test last) and a worker gets its next module only when it reaches
    the last test of its current one (xdist hands it out with two tests left, so a worker could
    hold two long modules while the other one runs out of work)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongestFirstScheduling(LoadFileScheduling):
        def _reschedule(self, node) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            # A worker runs a test only once it knows the next one: give it work at its last test.
            if self._pending_of(self.assigned_work[node]) > 1:
                return
            self._assign_work_unit(node)

    config.option.loadscopereorder = False
    return LongestFirstScheduling(config, log)


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's local Ray instance (2 CPUs); yields its GCS address for --address."""
    import logging

    import ray

    # A module that trains in this process without this fixture left Kiln's own local instance
    # connected (prepare_data starts one when none is): that module is done with it.
    if ray.is_initialized():
        ray.shutdown()
    # address="local": a new instance even when /tmp/ray/ray_current_cluster names someone else's.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A fresh run directory (MLflow sqlite store + checkpoints) for one test."""
    path = tmp_path / "runs"
    path.mkdir()
    return path


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """The slowest test files (setup, call and teardown summed over their tests, module fixtures
    included): what to look at first to shorten the suite, and what ``module_seconds`` should
    say."""
    seconds: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if isinstance(report, pytest.TestReport):
                path = report.nodeid.split("::")[0]
                seconds[path] = seconds.get(path, 0.0) + report.duration
    slowest = sorted(seconds.items(), key=lambda kv: kv[1], reverse=True)[:15]
    if len(seconds) > 1 and slowest:
        terminalreporter.write_sep("=", "slowest test files (seconds, setup + call + teardown)")
        for path, total in slowest:
            terminalreporter.write_line(f"{total:8.1f}  {path}")
