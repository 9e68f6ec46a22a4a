"""The one home of Ray and MLflow internals: everything Kiln needs that has no public API.

Each function names the version it was checked against. ``tests/test_compat.py`` calls every one of
them against the installed Ray, so an upgrade that moves or removes one fails loudly there instead
of on a user's serving path. Prefer a public API whenever one appears; then delete the function
here.
"""

from __future__ import annotations

CHECKED_RAY = "2.60"  # the Ray minor release every function below was checked against

# --- Ray core, dashboard and autoscaler --------------------------------------------------------

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
