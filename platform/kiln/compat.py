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


# Ray's raylet warns every driver when it has started more worker processes than twice its CPU
# count at once; Kiln's fractional CPUs (trials, Ray Train workers, Serve replicas, Ray Data tasks)
# on a small machine cause that routinely, and the advice it prints is for Ray's developers.
WORKER_POOL_WARNING = "worker processes have been started on node"


def drop_worker_pool_warnings() -> None:
    """Stop this driver from printing the raylet's worker-pool warning (above); every other
    message the raylet sends the driver (an actor's death, a task killed for memory) is printed as
    before. Idempotent.

    Checked against Ray 2.60: a driver's ``ray._private.worker.listen_error_messages`` thread
    prints each raylet message with the module's ``print_to_stdstream(data, ignore_prefix)``
    (looked up at each call), ``data["pid"] == "raylet"`` and the message in ``data["lines"]``."""
    from ray._private import worker

    original = worker.print_to_stdstream
    if getattr(original, "_kiln", False):
        return

    def print_to_stdstream(data, ignore_prefix: bool):
        if data.get("pid") == "raylet" and any(
            WORKER_POOL_WARNING in line for line in data.get("lines", ())
        ):
            return
        original(data, ignore_prefix)

    print_to_stdstream._kiln = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = print_to_stdstream


def serve_controller_alive() -> bool:
    """Whether Serve's controller actor is still registered on the connected cluster. After
    ``serve.shutdown()`` returns (its graceful shutdown may time out under load) the controller can
    live on until it kills itself; a ``serve.start`` meanwhile connects to it and fails with "killed
    by ray.kill".

    Checked against Ray 2.60: the controller is the detached actor ``SERVE_CONTROLLER_NAME`` in
    the namespace ``SERVE_NAMESPACE`` (``ray.serve._private.constants``); its name is released when
    it dies."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def serve_controller_pid(timeout: float = 5.0) -> int | None:
    """The process id of Serve's controller on the connected cluster; None when none is registered
    or it does not answer within ``timeout`` (dead, or restarting).

    Checked against Ray 2.60: the controller actor (found as in ``serve_controller_alive``) has a
    ``get_pid`` method; there is no public API for it."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        pid: Any = ray.get(controller.get_pid.remote(), timeout=timeout)
        return int(pid)
    except (ValueError, GetTimeoutError, RayError):
        return None


def serve_grpc_port() -> int | None:
    """The port of Ray Serve's gRPC ingress on the connected cluster; None when Serve does not run
    there or serves no gRPC (no servicer functions).

    Checked against Ray 2.60: as for ``serve_http_address`` (no public API), the controller
    client's actor handle (``ServeControllerClient._controller``) answers ``get_grpc_config``."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    grpc = ray.get(client._controller.get_grpc_config.remote())
    if not grpc.grpc_servicer_functions or grpc.port <= 0:
        return None
    return int(grpc.port)


# --- Ray Tune ----------------------------------------------------------------------------------
# RecordingASHA keeps its own copies of ASHA's settings instead of reading private attributes.


def grow_saved_sweep(experiment_dir: str, num_samples: int) -> int:
    """Raise the number of trials a saved Ray Tune experiment creates when it is restored. Returns
    the number it had.

    Checked against Ray 2.60. ``Tuner.restore`` takes no ``num_samples``: a restored experiment
    keeps the count its search algorithm saved. ``SearchGenerator.save_to_dir`` writes that state
    (``{"counter", "total_samples", "finished", ...}``) with ``ray.tune.utils.util._atomic_save``
    to ``SearchGenerator.CKPT_FILE_TMPL`` in the experiment folder, and the restored controller
    reads the newest such file (``_load_newest_checkpoint``); it creates trials while ``counter <
    total_samples``. Raises FileNotFoundError when the folder holds no saved search state.
    """
    import os

    from ray.tune.search.search_generator import SearchGenerator
    from ray.tune.utils.util import _atomic_save, _load_newest_checkpoint

    pattern = SearchGenerator.CKPT_FILE_TMPL.format("*")
    state = _load_newest_checkpoint(experiment_dir, pattern)
    if not state:
        raise FileNotFoundError(f"no saved Ray Tune search state in {experiment_dir}")
    import glob

    newest = os.path.basename(max(glob.glob(os.path.join(experiment_dir, pattern))))
    before = int(state["total_samples"])
    state["total_samples"] = num_samples
    _atomic_save(state, experiment_dir, newest, f"tmp-{newest}")
    return before


# Ray Serve's HAProxy config template binds two listeners on every interface, with no option to
# change it: the stats page (``listen stats`` / ``bind *:PORT``) and the Prometheus exporter
# (``frontend prometheus`` / ``bind :PORT``). Kiln binds both to loopback.
HAPROXY_ALL_INTERFACE_BINDS = (
    ("bind *:{{ config.stats_port }}", "bind 127.0.0.1:{{ config.stats_port }}"),
    ("bind :{{ config.metrics_port }}", "bind 127.0.0.1:{{ config.metrics_port }}"),
)
HAPROXY_LOOPBACK_HOOK = "kiln.compat.serve_process_setup"

# Kiln's Serve applications (kiln.serve.app: the root app and one per model, named by prefix), as
# the gRPC routing below needs them (tests/test_compat_serve.py checks that they agree).
KILN_ROOT_APP = "kiln"
KILN_MODEL_APP_PREFIX = "kiln-"
OIP_MODEL_RPCS = tuple(
    f"/inference.GRPCInferenceService/{m}" for m in ("ModelInfer", "ModelMetadata", "ModelReady")
)
# Ray 2.60's HAProxy gRPC frontend routes on the ``application`` metadata only, and with several
# applications a call without it is answered NOT_FOUND. Kiln's rules, before Ray's: a KServe v2
# call that names a model (its request's field 1, read from the body without decoding the rest,
# behind the 5-byte gRPC frame header; a body larger than HAProxy's buffer still has it in its
# first bytes) is sent to that model's application; everything else (server RPCs, a model that
# is not served) to Kiln's root application.
HAPROXY_GRPC_ROUTE_ANCHOR = (
    "    # Route per-app on the `application` metadata that Ray Serve clients attach.\n"
)
HAPROXY_GRPC_ROUTE_RULES = (
    "    # Kiln: KServe v2 model RPCs routed by the model's name (kiln.compat)\n"
    "    option http-buffer-request\n"
    f"    acl kiln_model_rpc path {' '.join(OIP_MODEL_RPCS)}\n"
    "    acl kiln_has_application req.hdr(application) -m found\n"
    f"    http-request set-header application {KILN_MODEL_APP_PREFIX}"
    "%[req.body,bytes(5),protobuf(1)] if kiln_model_rpc !kiln_has_application\n"
)
HAPROXY_GRPC_DEFAULT = "    default_backend default_grpc_backend\n{%- endif %}"
HAPROXY_GRPC_KILN_DEFAULT = (
    "{%- set kiln_root = grpc_backends | selectattr('app_name', 'equalto', "
    f"'{KILN_ROOT_APP}') | list %}}\n"
    "    default_backend {{ (kiln_root[0].name or 'unknown') if kiln_root "
    "else 'default_grpc_backend' }}\n{%- endif %}"
)


# The interface Serve's gRPC ingress servers bind (set by Kiln in the environment of Serve's
# controller and of its replicas: Serve's ``host``); Ray 2.60 binds them to ``[::]``.
GRPC_BIND_HOST_ENV = "KILN_SERVE_GRPC_HOST"


def serve_process_setup() -> None:
    """The worker-process setup hook of Serve's controller, the actors it starts (HAProxy's
    manager, the proxies) and Kiln's replicas: ``bind_haproxy_stats_to_loopback``,
    ``retry_requests_a_dead_replica_held``, ``route_grpc_by_model``,
    ``bind_grpc_ingress_to_host``."""
    bind_haproxy_stats_to_loopback()
    retry_requests_a_dead_replica_held()
    route_grpc_by_model()
    bind_grpc_ingress_to_host()


def bind_grpc_ingress_to_host() -> None:
    """Make Serve's gRPC ingress servers (each ingress replica's under HAProxy, the Python proxy's)
    listen on ``$KILN_SERVE_GRPC_HOST`` instead of every interface; nothing when it is unset.
    Idempotent.

    Checked against Ray 2.60: ``ray.serve._private.grpc_util.start_grpc_server`` imports
    ``default_impl.add_grpc_address`` when it runs and passes it ``"[::]:PORT"``."""
    import os

    from ray.serve._private import default_impl

    host = os.environ.get(GRPC_BIND_HOST_ENV)
    original = default_impl.add_grpc_address
    if not host or getattr(original, "_kiln", False):
        return
    shown = f"[{host}]" if ":" in host else host

    def add_grpc_address(grpc_server, server_address: str) -> None:
        if server_address.startswith("[::]:"):
            server_address = f"{shown}:{server_address.rsplit(':', 1)[1]}"
        original(grpc_server, server_address)

    add_grpc_address._kiln = True  # type: ignore[attr-defined]
    default_impl.add_grpc_address = add_grpc_address


def route_grpc_by_model() -> None:
    """Let a KServe v2 gRPC client that sends no ``application`` metadata (tritonclient) reach
    Kiln: HAProxy's gRPC frontend sends a model RPC to the model's application and the rest to the
    root application (the template rules above); Serve's Python gRPC proxy (``ingress: proxy``)
    sends a call whose application it cannot match to the root application, which forwards model
    RPCs by handle. Idempotent. Raises RuntimeError when Ray's code no longer has what it patches.

    Checked against Ray 2.60: ``haproxy_templates.HAPROXY_CONFIG_TEMPLATE`` (the gRPC frontend),
    ``proxy_router.ProxyRouter.get_handle_for_endpoint`` (the Python proxy's lookup by app)."""
    from ray.serve._private import haproxy_templates, proxy_router

    template = haproxy_templates.HAPROXY_CONFIG_TEMPLATE
    if HAPROXY_GRPC_ROUTE_RULES not in template:
        for needed in (HAPROXY_GRPC_ROUTE_ANCHOR, HAPROXY_GRPC_DEFAULT):
            if template.count(needed) != 1:
                raise RuntimeError(f"Ray Serve's HAProxy template changed: {needed.strip()!r}")
        template = template.replace(
            HAPROXY_GRPC_ROUTE_ANCHOR, HAPROXY_GRPC_ROUTE_RULES + HAPROXY_GRPC_ROUTE_ANCHOR
        ).replace(HAPROXY_GRPC_DEFAULT, HAPROXY_GRPC_KILN_DEFAULT)
        _set_haproxy_template(template)

    router = proxy_router.ProxyRouter
    original = router.get_handle_for_endpoint
    if getattr(original, "_kiln", False):
        return

    def get_handle_for_endpoint(self, target_app_name: str):
        found = original(self, target_app_name)
        return found if found is not None else original(self, KILN_ROOT_APP)

    get_handle_for_endpoint._kiln = True  # type: ignore[attr-defined]
    router.get_handle_for_endpoint = get_handle_for_endpoint  # type: ignore[method-assign]


# HAProxy replays a request whose replica closed the connection without answering (``retry-on
# empty-response``) only when it holds the whole request when it sends it; otherwise, on a client
# connection that already carried a request, it closes the client's connection without an answer or
# a log line, for the client to retry (HAProxy's documented keep-alive behaviour; most clients,
# ``requests`` among them, do not retry a POST). Waiting for the body before connecting makes every
# request under ``tune.bufsize`` replayable.
HAPROXY_DEFAULTS_ANCHOR = "    option abortonclose\n"
HAPROXY_BUFFER_REQUEST = "    option http-buffer-request\n"


def retry_requests_a_dead_replica_held() -> None:
    """Make HAProxy buffer each HTTP request's body before it picks a replica (``option
    http-buffer-request`` in the template's ``defaults``), so that a request in flight on a replica
    that dies is retried on another one instead of closing the client's connection. Idempotent.
    Raises RuntimeError when the template no longer has its anchor.

    Checked against Ray 2.60: ``haproxy_templates.HAPROXY_CONFIG_TEMPLATE``'s ``defaults`` section
    holds ``option abortonclose`` once."""
    from ray.serve._private import haproxy_templates

    template = haproxy_templates.HAPROXY_CONFIG_TEMPLATE
    if HAPROXY_DEFAULTS_ANCHOR + HAPROXY_BUFFER_REQUEST in template:
        return
    if template.count(HAPROXY_DEFAULTS_ANCHOR) != 1:
        raise RuntimeError(
            f"Ray Serve's HAProxy template changed: {HAPROXY_DEFAULTS_ANCHOR.strip()!r}"
        )
    _set_haproxy_template(
        template.replace(HAPROXY_DEFAULTS_ANCHOR, HAPROXY_DEFAULTS_ANCHOR + HAPROXY_BUFFER_REQUEST)
    )


def _set_haproxy_template(template: str) -> None:
    from ray.serve._private import haproxy_templates

    haproxy_templates.HAPROXY_CONFIG_TEMPLATE = template
    import sys

    loaded = sys.modules.get("ray.serve._private.haproxy")
    if loaded is not None:  # imported before the hook ran: patch its copy too
        loaded.HAPROXY_CONFIG_TEMPLATE = template  # type: ignore[attr-defined]


# How long Serve's controller waits for a new proxy (the HAProxy manager, the fallback proxy) to
# say it is ready before it kills it as unhealthy and starts another: Ray's 5 s is short on a
# loaded machine (the proxy imports Serve and starts HAProxy), and a proxy killed while
# ``serve.start`` waits on it fails the start ("The actor never ran - it was cancelled before it
# started running", seen with two busy training threads on 2 cores).
PROXY_READY_TIMEOUT_S = 30.0


def serve_controller_patience_env() -> dict[str, str]:
    """Environment for Serve's controller: a proxy gets PROXY_READY_TIMEOUT_S to start.

    Checked against Ray 2.60: ``ray.serve._private.constants.PROXY_READY_CHECK_TIMEOUT_S`` is read
    from ``RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S`` when the controller imports it (each restart of
    a proxy then doubles, triples... the wait)."""
    return {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": f"{PROXY_READY_TIMEOUT_S:g}"}


def haproxy_loopback_env() -> dict[str, str]:
    """Environment variables for Serve's controller (``controller_options["runtime_env"]``, which
    takes ``env_vars`` only) and Kiln's replicas, that run ``serve_process_setup`` in them and in
    the actors the controller starts (the HAProxy manager, the proxies).

    Checked against Ray 2.60: a ``worker_process_setup_hook`` given as a module path is carried by
    the reserved variable ``ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR``
    (``ray._private.runtime_env.setup_hook.export_setup_func_module``), which every worker reads at
    start (``default_worker.py``)."""
    from ray._private import ray_constants

    return {ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR: HAPROXY_LOOPBACK_HOOK}


def bind_haproxy_stats_to_loopback() -> None:
    """A Ray worker-process setup hook (``runtime_env["worker_process_setup_hook"]`` of Serve's
    controller, inherited by the HAProxy manager actor it creates): rewrites Serve's HAProxy config
    template so that HAProxy's stats page and Prometheus exporter listen on 127.0.0.1 only. Runs
    before the manager imports ``ray.serve._private.haproxy`` (which copies the template by name).
    Raises RuntimeError when the template no longer holds the binds it replaces.

    Checked against Ray 2.60: ``ray.serve._private.haproxy_templates.HAPROXY_CONFIG_TEMPLATE``.
    """
    from ray.serve._private import haproxy_templates

    template = haproxy_templates.HAPROXY_CONFIG_TEMPLATE
    for old, new in HAPROXY_ALL_INTERFACE_BINDS:
        if old not in template and new not in template:
            raise RuntimeError(f"Ray Serve's HAProxy template has no '{old}' any more")
        template = template.replace(old, new)
    template = use_kiln_haproxy_error_file(template)
    _set_haproxy_template(template)


# Serve's HAProxy answers every 502/503/504 of its own (a replica that died mid-request, no replica
# up, a timeout) with one error file: a plain-text "500 Internal Server Error". Kiln points those
# three at its own file, whose raw HTTP response the serving layer gives in HAPROXY_ERROR_ENV.
HAPROXY_ERROR_ENV = "KILN_HAPROXY_ERROR_RESPONSE"
HAPROXY_ERRORFILE_LINES = tuple(
    f"errorfile {code} {{{{ config.error_file_path }}}}" for code in (502, 503, 504)
)
KILN_ERROR_FILE = "kiln-error.http"


def haproxy_error_file_env(raw_response: str) -> dict[str, str]:
    """Environment for Serve's controller (inherited by its HAProxy manager) that makes
    ``bind_haproxy_stats_to_loopback`` answer HAProxy's own errors with ``raw_response`` (a whole
    HTTP/1.1 response: status line, headers, blank line, body). Base64: the value travels through
    Ray's runtime environment, which is no place for line breaks and quotes."""
    import base64

    return {HAPROXY_ERROR_ENV: base64.b64encode(raw_response.encode()).decode()}


def use_kiln_haproxy_error_file(template: str) -> str:
    """``template`` with its ``errorfile 502|503|504`` lines pointing at Kiln's error file, written
    beside HAProxy's config from ``HAPROXY_ERROR_ENV``; ``template`` unchanged when that variable is
    not set (a process that is not Kiln's HAProxy manager). Raises RuntimeError when the template
    no longer holds the lines it replaces.

    Checked against Ray 2.60: ``HAProxyApi._initialize_directories_and_error_files`` writes
    ``500.http`` beside ``RAY_SERVE_HAPROXY_CONFIG_FILE_LOC`` and the template's ``defaults``
    section names it for 502, 503 and 504."""
    import os

    encoded = os.environ.get(HAPROXY_ERROR_ENV)
    if not encoded:
        return template
    import base64

    from ray.serve._private.constants import RAY_SERVE_HAPROXY_CONFIG_FILE_LOC

    from kiln.files import atomic_write_bytes

    path = os.path.join(os.path.dirname(RAY_SERVE_HAPROXY_CONFIG_FILE_LOC), KILN_ERROR_FILE)
    data = base64.b64decode(encoded)
    try:
        with open(path, "rb") as f:
            current: bytes | None = f.read()
    except FileNotFoundError:
        current = None
    if current != data:  # every worker of the controller runs the hook: write once
        atomic_write_bytes(path, data)
    for line in HAPROXY_ERRORFILE_LINES:
        kiln_line = line.replace("{{ config.error_file_path }}", path)
        if line not in template and kiln_line not in template:
            raise RuntimeError(f"Ray Serve's HAProxy template has no '{line}' any more")
        template = template.replace(line, kiln_line)
    return template
