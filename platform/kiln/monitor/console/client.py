"""Reading a served model's live monitoring over HTTP (``GET
/v2/models/NAME[/versions/V]/monitor``)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kiln.errors import KilnError


def serving_url(
    run_dir: str | Path, address: str | None = None, url: str | None = None, debug: bool = False
) -> str:
    """The serving base URL: ``url`` if given, else the one ``kiln serve start`` recorded in
    RUN_DIR/serve, else asked from the Ray cluster at ``address``. Raises KilnError."""
    if url:
        return url.rstrip("/")
    from kiln.serve.instance import load_state

    state = load_state(run_dir)
    if state is not None and (address is None or state.address == address):
        return state.url
    if not (address or os.environ.get("RAY_ADDRESS")):
        raise KilnError(
            f"nothing is being served from {Path(run_dir).expanduser().resolve() / 'serve'}; give "
            "--url "
            "of the server or --address of the cluster that serves"
        )
    from kiln.serve.cluster import connect, http_url, serve_http

    connect(address or os.environ["RAY_ADDRESS"], debug)
    return http_url(*serve_http())


def monitor_through_ray(
    run_dir: str | Path,
    address: str | None,
    model: str,
    version: str | None = None,
    debug: bool = False,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """The monitor JSON of ``model`` with its window (recent raw rows and the reference
    statistics), asked of a replica through Ray (its deployment handle), for a server that has no
    API key and so serves the window to nobody over HTTP. Ray's own authentication guards it.
    The cluster: ``address``, else RAY_ADDRESS, else the one RUN_DIR's serve state records.
    Raises KilnError."""
    import ray
    from ray.exceptions import RayError
    from ray.serve.exceptions import RayServeException

    from kiln.errors import first_line
    from kiln.serve.app import model_app_name
    from kiln.serve.cluster import connect, find_target

    target, _ = find_target(run_dir, address)
    if not ray.is_initialized():
        connect(target, debug)
    from ray import serve

    try:
        handle = serve.get_app_handle(model_app_name(model))
        report = handle.monitor_status.remote(None, True).result(timeout_s=timeout)
    except RayServeException:
        raise KilnError(f"model '{model}' is not served on {target}") from None
    except (RayError, TimeoutError) as exc:
        raise KilnError(f"the monitor of '{model}' did not answer: {first_line(exc)}") from None
    if version is not None:
        if version not in report["versions"]:
            raise KilnError(
                f"model '{model}' has no served version '{version}' "
                f"(served: {', '.join(report['versions'])})"
            )
        report["versions"] = {version: report["versions"][version]}
    return report


def fetch_monitor(
    base_url: str,
    model: str,
    version: str | None = None,
    window: bool = False,
    api_key: str | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """The monitor JSON of ``model`` (all served versions, or ``version``). Raises KilnError."""
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/monitor"
    request = urllib.request.Request(
        base_url + path + ("?window=1" if window else ""),
        headers={"X-API-Key": api_key} if api_key else {},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", "")
        except (ValueError, AttributeError, OSError):  # not Kiln's JSON error body
            message = exc.reason
        raise KilnError(f"{base_url}{path}: {exc.code} {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise KilnError(
            f"cannot reach the server at {base_url} ({getattr(exc, 'reason', exc)})"
        ) from None
