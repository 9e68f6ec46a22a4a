"""The one home of Ray and MLflow internals: everything Kiln needs that has no public API.

Each function names the version it was checked against. ``tests/test_compat.py`` calls every one of
them against the installed Ray, so an upgrade that moves or removes one fails loudly there instead
of on a user's serving path. Prefer a public API whenever one appears; then delete the function
here.
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

# --- Ray Tune ----------------------------------------------------------------------------------
