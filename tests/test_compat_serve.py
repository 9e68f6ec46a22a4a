"""The Ray Serve section of ``kiln.compat`` against the installed Ray: an upgrade that moves or
changes a private API Kiln relies on fails here, loudly, instead of on a user's serving path."""

from __future__ import annotations

import inspect

import pytest

from served_models import free_port


def test_the_private_serve_client_lookup_is_still_there():
    from ray.serve.context import _get_global_client

    assert "raise_if_no_controller_running" in inspect.signature(_get_global_client).parameters


@pytest.mark.slow
def test_serve_http_address_reads_what_serve_started_with(ray_cluster):
    from ray import serve

    from kiln.compat import serve_http_address

    running = serve_http_address()
    if running is not None:  # another module of this session left Serve running: read it
        host, port = running
        assert isinstance(host, str) and host and isinstance(port, int) and port > 0
        return
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        assert serve_http_address() == ("127.0.0.1", port)
    finally:
        serve.shutdown()
    assert serve_http_address() is None
