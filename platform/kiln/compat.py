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
HAPROXY_LOOPBACK_HOOK = "kiln.compat.bind_haproxy_stats_to_loopback"


def haproxy_loopback_env() -> dict[str, str]:
    """Environment variables for Serve's controller (``controller_options["runtime_env"]``, which
    takes ``env_vars`` only) that run ``bind_haproxy_stats_to_loopback`` in it and in the actors
    it starts, the HAProxy manager among them.

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
    haproxy_templates.HAPROXY_CONFIG_TEMPLATE = template
    import sys

    loaded = sys.modules.get("ray.serve._private.haproxy")
    if loaded is not None:  # imported before the hook ran: patch its copy too
        loaded.HAPROXY_CONFIG_TEMPLATE = template  # type: ignore[attr-defined]


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
