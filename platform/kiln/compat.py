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

# --- Ray Tune ----------------------------------------------------------------------------------
