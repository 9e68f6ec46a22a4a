"""The one home of Ray and MLflow internals: everything Kiln needs that has no public API.

Each function names the version it was checked against. ``tests/test_compat_*.py`` call every
one of them against the installed Ray, so an upgrade that moves or removes one fails loudly there
instead of on a user's serving path. Prefer a public API whenever one appears; then delete the
function here.
"""

from __future__ import annotations

from typing import Any

CHECKED_RAY = "2.60"  # the Ray minor release every function below was checked against

# --- Ray core, dashboard and autoscaler --------------------------------------------------------


def validate_cluster_launcher_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check a Ray cluster-launcher config (what ``ray up`` takes) offline, as ``ray up`` does
    before launching anything: the provider's defaults filled in (``prepare_config``), then Ray's
    JSON schema and checks (``validate_config``). Returns the prepared config (``config`` is not
    changed).

    Raises what Ray raises: jsonschema.ValidationError (schema), KeyError (a missing required
    field), ValueError / RuntimeError / TypeError (Ray's own checks).

    Checked against Ray 2.60: ``ray.autoscaler._private.util.prepare_config`` and
    ``validate_config``. Ray has no public API for this (``ray up`` calls them inside
    ``create_or_update_cluster``, which also launches the cluster).
    """
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared: dict[str, Any] = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# --- Ray Serve ---------------------------------------------------------------------------------


def serve_http_address() -> tuple[str, int] | None:
    """(host, port) that Ray Serve's HTTP ingress listens on, on the connected cluster; None when
    Serve does not run there (no controller).

    Checked against Ray 2.60. Serve fixes its HTTP options when it first starts on a cluster, and
    no public Python API reads them back: ``serve.status()`` has no HTTP options, and the public
    ``ServeInstanceDetails`` comes only from the dashboard's REST API, which a cluster given by
    ``--address`` may not expose. ``ray.serve.context._get_global_client`` (with
    ``raise_if_no_controller_running=False``) returns the controller client, whose
    ``http_config`` holds them.
    """
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    http = client.http_config
    return str(http.host), int(http.port)


# --- Ray Tune ----------------------------------------------------------------------------------
# None: RecordingASHA keeps its own copies of ASHA's settings instead of reading private attributes.
