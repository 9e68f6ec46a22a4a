"""The Ray core / dashboard / autoscaler section of kiln.compat against the installed Ray: each
function Kiln needs without a public API must still exist and behave as checked (a Ray upgrade that
moves one fails here, loudly, not on a user's machine)."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml

from conftest import REPO
from kiln import compat


def test_the_installed_ray_is_the_minor_release_compat_was_checked_against():
    import ray

    assert ray.__version__.rsplit(".", 1)[0] == compat.CHECKED_RAY, (
        f"Ray {ray.__version__} is installed but kiln.compat was checked against "
        f"{compat.CHECKED_RAY}: check every function there, then update CHECKED_RAY"
    )


def test_cluster_launcher_validation_still_lives_where_kiln_calls_it():
    from ray.autoscaler._private import util

    assert callable(util.prepare_config) and callable(util.validate_config)


def test_cluster_launcher_validation_fills_defaults_and_leaves_the_input_alone():
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    before = copy.deepcopy(raw)
    prepared = compat.validate_cluster_launcher_config(raw)
    assert raw == before
    assert prepared["cluster_name"] == "kiln" and prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_cluster_launcher_validation_raises_jsonschema_errors_for_schema_mistakes():
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    raw["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        compat.validate_cluster_launcher_config(raw)


def test_the_drivers_raylet_warning_about_its_worker_pool_is_dropped_and_no_other(capsys):
    """Ray's driver thread prints raylet messages through the function Kiln wraps, looked up at
    each call; after the wrap, the worker-pool warning is gone and other raylet messages stay."""
    import inspect

    from ray._private import worker

    from kiln.compat import WORKER_POOL_WARNING, drop_worker_pool_warnings

    listener = inspect.getsource(worker.listen_error_messages)
    assert "print_to_stdstream(" in listener and '"pid": "raylet"' in listener
    original = worker.print_to_stdstream
    try:
        drop_worker_pool_warnings()
        wrapped = worker.print_to_stdstream
        drop_worker_pool_warnings()  # idempotent: one wrap
        assert worker.print_to_stdstream is wrapped is not original
        # (a node id of this test's own: the session's driver may print the raylet's real
        # warning meanwhile, as a full run saw)
        warning = f"WARNING: 8 PYTHON {WORKER_POOL_WARNING}: kiln-test-node with address: ..."
        death = "A worker died or was killed while executing a task by an unexpected system error."
        for line in (warning, death):
            worker.print_to_stdstream(
                {"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False
            )
    finally:
        worker.print_to_stdstream = original
    out = capsys.readouterr().out
    assert "kiln-test-node" not in out and death in out
