"""HTTP plumbing shared by the Serve deployments: bounded body reads, the API key, JSON
responses."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from kiln.serve.protocol import ProtocolError, error_body

API_KEY_HEADER = "x-api-key"
RETRY_AFTER_S = 1  # what a client is told to wait before retrying a 503 of the ingress


def key_digest(key: str) -> str:
    """sha256 of an API key: replicas get the digest, so the key itself is stored nowhere in Ray."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_api_key(headers, expected_digest: str | None) -> None:
    """Raise ProtocolError 401 (no key) or 403 (wrong key) unless the request carries the key."""
    if expected_digest is None:
        return
    presented = headers.get(API_KEY_HEADER)
    if presented is None:
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            presented = auth[7:].strip()
    if not presented:
        raise ProtocolError(
            "missing API key: send the header 'X-API-Key: KEY' or 'Authorization: Bearer KEY'", 401
        )
    if not hmac.compare_digest(key_digest(presented), expected_digest):
        raise ProtocolError("wrong API key", 403)


async def read_body(request, limit: int) -> bytes:
    """The request body, refusing (413) one larger than ``limit`` bytes before reading it when
    possible."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ProtocolError(f"Content-Length '{length}' is not an integer") from None
        if declared > limit:
            raise ProtocolError(
                f"request body of {declared} bytes is over the limit of {limit} bytes "
                "(serve.max_request_bytes)",
                413,
            )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(
                f"request body is over the limit of {limit} bytes (serve.max_request_bytes)", 413
            )
        chunks.append(chunk)
    return b"".join(chunks)


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None):
    from starlette.responses import Response

    return Response(
        json.dumps(payload, separators=(",", ":")).encode(),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


def error_response(message: str, status: int, headers: dict[str, str] | None = None):
    from starlette.responses import Response

    return Response(
        error_body(message), status_code=status, headers=headers, media_type="application/json"
    )


def method_not_allowed(method: str, path: str, allowed: str):
    return error_response(
        f"{method} is not allowed on {path} (use {allowed})", 405, {"Allow": allowed}
    )


def unavailable_response() -> str:
    """The whole HTTP response the ingress (HAProxy) gives when no replica answered a request: the
    replica died and the retry failed too, or none is up. Kiln's JSON error, 503 with
    ``Retry-After``: the request never reached a model that answered, so it is safe to retry."""
    body = error_body(
        "no replica of this model answered (one died or none is up yet); retry in "
        f"{RETRY_AFTER_S} s"
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Retry-After: {RETRY_AFTER_S}\r\n"
        "Cache-Control: no-store\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head + body.decode()
