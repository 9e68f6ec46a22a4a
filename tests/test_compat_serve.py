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
def test_serve_http_address_reads_what_serve_started_with_and_the_controller_goes_at_shutdown(
    ray_cluster,
):
    import psutil
    from ray import serve

    from kiln.compat import serve_controller_alive, serve_controller_pid, serve_http_address
    from kiln.serve.cluster import shutdown_serve

    running = serve_http_address()
    if running is not None:  # another module of this session left Serve running: read it
        host, port = running
        assert isinstance(host, str) and host and isinstance(port, int) and port > 0
        return  # (its controller's pid is not asked: seen not answering within 5 s in a full run)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        assert serve_http_address() == ("127.0.0.1", port)
        assert serve_controller_alive()
        pid = serve_controller_pid(timeout=60)
        assert pid is not None and "ServeController" in psutil.Process(pid).name()
    finally:
        shutdown_serve()  # returns once the controller is gone (serve_controller_alive)
    assert not serve_controller_alive()
    assert serve_controller_pid() is None
    assert serve_http_address() is None


def test_haproxy_template_binds_stats_and_metrics_on_loopback_after_the_hook():
    """The hook rewrites Serve's HAProxy template (stats page, Prometheus exporter) to 127.0.0.1;
    fails when Ray's template changes so that the binds are no longer found."""
    import jinja2
    from ray.serve._private import haproxy_templates

    from kiln.compat import HAPROXY_ALL_INTERFACE_BINDS, bind_haproxy_stats_to_loopback

    original = haproxy_templates.HAPROXY_CONFIG_TEMPLATE
    for old, _ in HAPROXY_ALL_INTERFACE_BINDS:
        assert old in original  # Ray 2.60 still binds them on all interfaces
    try:
        bind_haproxy_stats_to_loopback()
        patched = haproxy_templates.HAPROXY_CONFIG_TEMPLATE
        jinja2.Environment().parse(patched)  # still a template
        for old, new in HAPROXY_ALL_INTERFACE_BINDS:
            assert old not in patched and new in patched
        bind_haproxy_stats_to_loopback()  # idempotent
        assert haproxy_templates.HAPROXY_CONFIG_TEMPLATE == patched
    finally:
        haproxy_templates.HAPROXY_CONFIG_TEMPLATE = original


def test_haproxy_buffers_requests_so_that_a_dead_replicas_are_retried_after_the_hook():
    """The hook adds ``option http-buffer-request`` to the template's ``defaults`` once (HAProxy
    replays a request whose replica died only when it held the whole request); fails when Ray's
    template no longer has its anchor."""
    import jinja2
    from ray.serve._private import haproxy_templates

    from kiln.compat import (
        HAPROXY_BUFFER_REQUEST,
        HAPROXY_DEFAULTS_ANCHOR,
        retry_requests_a_dead_replica_held,
    )

    original = haproxy_templates.HAPROXY_CONFIG_TEMPLATE
    assert original.count(HAPROXY_DEFAULTS_ANCHOR) == 1
    try:
        retry_requests_a_dead_replica_held()
        patched = haproxy_templates.HAPROXY_CONFIG_TEMPLATE
        retry_requests_a_dead_replica_held()  # idempotent
        assert haproxy_templates.HAPROXY_CONFIG_TEMPLATE == patched
        jinja2.Environment().parse(patched)
        defaults = patched[patched.index("\ndefaults\n") : patched.index("\nfrontend ")]
        assert defaults.count(HAPROXY_BUFFER_REQUEST) == 1
        assert "retry-on {{ config.retry_on }}" in defaults  # what the buffering is for
    finally:
        haproxy_templates.HAPROXY_CONFIG_TEMPLATE = original


def test_the_setup_hook_variable_is_the_one_ray_workers_read():
    from ray._private.runtime_env.setup_hook import export_setup_func_module

    from kiln.compat import HAPROXY_LOOPBACK_HOOK, haproxy_loopback_env

    assert export_setup_func_module({}, HAPROXY_LOOPBACK_HOOK)["env_vars"] == haproxy_loopback_env()


def serve_constant_in_a_fresh_process(name: str, env: dict[str, str]) -> str:
    """``ray.serve._private.constants.NAME`` as a new process with ``env`` reads it (Serve's
    processes read their settings from the environment once, at import)."""
    import subprocess
    import sys

    from conftest import kiln_env

    read = subprocess.run(
        [sys.executable, "-c", f"from ray.serve._private import constants as c; print(c.{name})"],
        env=kiln_env(env),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return read.stdout.strip()


def test_serves_controller_reads_the_proxy_patience_kiln_gives_it():
    """In a fresh process, as Serve's controller starts: the variable sets how long a new proxy
    may take to be ready before the controller kills it."""
    from kiln.compat import PROXY_READY_TIMEOUT_S, serve_controller_patience_env

    read = serve_constant_in_a_fresh_process(
        "PROXY_READY_CHECK_TIMEOUT_S", serve_controller_patience_env()
    )
    assert float(read) == PROXY_READY_TIMEOUT_S != 5.0


def test_grpc_routing_rules_in_haproxy_template_after_the_hook():
    """The hook adds Kiln's gRPC rules to Serve's HAProxy template (a model RPC to its model's
    application, the rest to the root app) and still renders; fails when Ray's template no longer
    has the lines it anchors on."""
    import jinja2
    from ray.serve._private import haproxy_templates, proxy_router

    from kiln.compat import (
        HAPROXY_GRPC_DEFAULT,
        HAPROXY_GRPC_ROUTE_ANCHOR,
        HAPROXY_GRPC_ROUTE_RULES,
        route_grpc_by_model,
    )

    original = haproxy_templates.HAPROXY_CONFIG_TEMPLATE
    lookup = proxy_router.ProxyRouter.get_handle_for_endpoint
    assert original.count(HAPROXY_GRPC_ROUTE_ANCHOR) == 1
    assert original.count(HAPROXY_GRPC_DEFAULT) == 1
    try:
        route_grpc_by_model()
        patched = haproxy_templates.HAPROXY_CONFIG_TEMPLATE
        route_grpc_by_model()  # idempotent
        assert haproxy_templates.HAPROXY_CONFIG_TEMPLATE == patched
        assert patched.count(HAPROXY_GRPC_ROUTE_RULES) == 1
        assert HAPROXY_GRPC_DEFAULT not in patched
        env = jinja2.Environment()
        env.parse(patched)
        # the root app's backend becomes the gRPC frontend's default among several apps
        frontend = patched[patched.index(HAPROXY_GRPC_ROUTE_ANCHOR) :]
        frontend = frontend[: frontend.index("{%- set backend = grpc_fallback_backend_with")]

        class Backend:
            def __init__(self, name, app_name):
                self.name, self.app_name = name, app_name

        text = env.from_string(frontend + "{%- endif %}").render(
            grpc_backends=[Backend("b1", "kiln-digits"), Backend("b0", "kiln")],
            grpc_fallback_backend_with_health_config=None,
        )
        assert "default_backend b0" in text
    finally:
        haproxy_templates.HAPROXY_CONFIG_TEMPLATE = original
        proxy_router.ProxyRouter.get_handle_for_endpoint = lookup


def test_kiln_app_names_in_compat_match_the_serve_apps():
    from kiln.compat import KILN_MODEL_APP_PREFIX, KILN_ROOT_APP
    from kiln.serve.app import MODEL_APP_PREFIX, ROOT_APP

    assert (KILN_ROOT_APP, KILN_MODEL_APP_PREFIX) == (ROOT_APP, MODEL_APP_PREFIX)


def test_serve_reads_the_variable_that_puts_user_code_on_the_replicas_loop():
    """Model replicas get SEPARATE_USER_LOOP_ENV "0" (kiln.serve.app): a Ray release that renamed
    the variable would silently bring back the thread hand-off Kiln measured away (issue 15)."""
    from kiln.serve.app import SEPARATE_USER_LOOP_ENV

    read = serve_constant_in_a_fresh_process(
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", {SEPARATE_USER_LOOP_ENV: "0"}
    )
    assert read == "False"
