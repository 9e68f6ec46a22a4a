"""Ray token authentication, client side: find the cluster's token where Ray looks for it, and send
it.

Ray (2.60) protects a cluster's dashboard and Jobs API with a bearer token when the cluster runs
with ``RAY_AUTH_MODE=token``. Ray's own SDK sends the token only when the *client* also sets that
mode; Kiln sends it whenever one is found, so submitting to a protected cluster needs no extra
setting.
"""

from __future__ import annotations

import os
from pathlib import Path

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


def default_token_path() -> Path:
    """Where ``ray get-auth-token --generate`` writes the token: ``~/.ray/auth_token``."""
    return Path.home() / ".ray" / "auth_token"


def token_source() -> str:
    """Where :func:`find_token` looks first, in words (for error messages)."""
    if os.environ.get(TOKEN_ENV):
        return f"${TOKEN_ENV}"
    if os.environ.get(TOKEN_PATH_ENV):
        return os.environ[TOKEN_PATH_ENV]
    return str(default_token_path())


def find_token() -> str | None:
    """The Ray auth token, in Ray's own order: ``$RAY_AUTH_TOKEN``, the file at
    ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``. Returns None when there is none, or when
    ``RAY_AUTH_MODE=disabled``."""
    if os.environ.get(AUTH_MODE_ENV, "").lower() == "disabled":
        return None
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    path = (
        Path(os.environ[TOKEN_PATH_ENV]).expanduser()
        if os.environ.get(TOKEN_PATH_ENV)
        else default_token_path()
    )
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def auth_headers() -> dict[str, str]:
    """``{"Authorization": "Bearer TOKEN"}`` when a token is found, else ``{}``."""
    token = find_token()
    return {"Authorization": f"Bearer {token}"} if token else {}
