"""Connecting to a cluster's Ray Jobs API (the dashboard address, ``http://HOST:8265``) with clear
failures."""

from __future__ import annotations

import os
from urllib.parse import urlparse

from kiln.errors import KilnError, first_line
from kiln.ray_connection import auth_headers, tcp_refusal, token_source

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def resolve_address(address: str | None) -> str:
    """The Jobs API URL: ``address``, else ``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS`` when
    it is a URL (Ray's own CLI reads the same two), else the head started by ``kiln cluster start``,
    else http://127.0.0.1:8265. ``HOST:PORT`` gets ``http://`` in front, a bare ``HOST`` also
    ``:8265``."""
    if not address:
        env_address = os.environ.get("RAY_ADDRESS", "")
        address = os.environ.get("RAY_API_SERVER_ADDRESS") or (
            env_address if "://" in env_address else None
        )
    if not address:
        from kiln.cluster.local import read_state

        state = read_state()
        address = state.dashboard_url if state and state.is_running() else DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}" if ":" in address else f"http://{address}:8265"
    return address.rstrip("/")


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise KilnError at once when nothing accepts connections at the address's host and port."""
    url = urlparse(address)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise KilnError(
            f"--address {address}: give the cluster's Jobs API URL, e.g. http://HOST:8265"
        )
    port = url.port or (443 if url.scheme == "https" else 80)  # what the SDK's requests will use
    refusal = tcp_refusal(url.hostname, port, timeout)
    if refusal is not None and refusal.unknown_host:
        raise KilnError(
            f"cannot reach the Ray Jobs API at {address}: {refusal.describe(url.hostname)}; "
            "check --address (http://HOST:8265)"
        )
    if refusal is not None:
        raise KilnError(
            f"cannot reach the Ray Jobs API at {address} ({refusal.reason}); is the cluster "
            "running? (start one with 'kiln cluster start', or pass --address http://HOST:8265)"
        )


def connect(address: str | None, debug: bool = False):
    """A JobSubmissionClient for ``address`` (see resolve_address), sending the Ray auth token if
    there is one.

    Ray's SDK logs each upload and websocket close; those lines are kept out of the terminal unless
    ``debug``. Raises KilnError when nothing answers there, when the address is not a Ray Jobs API,
    or when the cluster wants a token that is missing or wrong.
    """
    address = resolve_address(address)
    check_reachable(address)
    import logging

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray").setLevel(logging.DEBUG if debug else logging.ERROR)
    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except AuthenticationError as exc:
        raise auth_error(address, exc) from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise KilnError(
            f"{address} does not answer as a Ray Jobs API ({first_line(exc)}); give the "
            "dashboard address (http://HOST:8265), not the GCS address (HOST:6379)"
        ) from None


def auth_error(address: str, exc: Exception) -> KilnError:
    """The one-line message for a 401 (no token sent) or 403 (wrong token) from a token-protected
    cluster."""
    if "Authentication failed" in str(exc) or "403" in str(exc):
        return KilnError(
            f"the cluster at {address} rejected the Ray auth token from {token_source()}: "
            "it is not this cluster's token (get it on the head with 'ray get-auth-token')"
        )
    return KilnError(
        f"the cluster at {address} requires a Ray auth token and none was found: set "
        "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token "
        "(get it on the head with 'ray get-auth-token')"
    )
