"""kiln serve start CONFIG|MODEL_URI... [key=value ...] | kiln serve status | kiln serve stop"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.commands.common import add_json_argument, emit_json, say

if TYPE_CHECKING:
    from kiln.serve.config import ServeConfig
    from kiln.serve.lifecycle import ServingHooks

HELP = "serve registered models over HTTP (Open Inference Protocol) with Ray Serve"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="serve_command", metavar="ACTION", required=True)
    start = sub.add_parser(
        "start",
        help="deploy models and return once they answer (they keep running)",
        description="Serve registered models. TARGETS: a YAML config with a 'serve' section, "
        "models:/NAME/VERSION or models:/NAME@ALIAS URIs, and key=value overrides.",
    )
    start.add_argument("targets", nargs="+", metavar="CONFIG|MODEL_URI|key=value")
    start.add_argument(
        "--host", help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes the server)"
    )
    start.add_argument("--port", type=int, help="HTTP port (default 8000; 0 picks a free one)")
    start.add_argument(
        "--ingress",
        choices=["proxy", "haproxy"],
        help="'haproxy' (default: HAProxy forwards straight to the replicas) or 'proxy' (Ray "
        "Serve's Python proxy, slower); see README: Serving, Safety",
    )
    start.add_argument(
        "--api-key-env", metavar="VAR", help="require the API key held in environment variable VAR"
    )
    start.add_argument(
        "--timeout",
        type=float,
        help="seconds to wait for the models to run (serve.start_timeout_s)",
    )
    start.add_argument(
        "--num-cpus", type=float, help="CPUs of the local Ray instance Kiln starts (default: all)"
    )
    start.set_defaults(_serve_run=_start)
    status = sub.add_parser("status", help="what is served, where, and per-version request counts")
    status.set_defaults(_serve_run=_status)
    stop = sub.add_parser(
        "stop", help="remove the served models (and the local Ray instance Kiln started)"
    )
    stop.set_defaults(_serve_run=_stop)
    for cmd in (start, status, stop):
        cmd.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show tracebacks and Ray's logs",
        )
        cmd.add_argument(
            "--address",
            help="Ray cluster address (default: RAY_ADDRESS, else the local instance "
            "Kiln starts and records in RUN_DIR/serve)",
        )
        cmd.add_argument(
            "--run-dir",
            help="where the serving state is kept (default: experiment.run_dir, 'runs')",
        )
        add_json_argument(cmd)
    start.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI of the registry (default: experiment.tracking_uri, "
        "MLFLOW_TRACKING_URI, else RUN_DIR/mlflow.db)",
    )


def split_targets(targets: list[str]) -> tuple[str | None, list[str], list[str]]:
    """(config path, model URIs, key=value overrides). Raises ConfigError for anything else."""
    from kiln.errors import ConfigError

    config, uris, overrides = None, [], []
    for item in targets:
        if item.startswith("models:/"):
            uris.append(item)
        elif "=" in item:
            overrides.append(item)
        elif item.endswith((".yaml", ".yml")) or Path(item).is_file():
            if config is not None:
                raise ConfigError(f"two configs given ({config}, {item}); give one")
            config = item
        else:
            raise ConfigError(
                f"'{item}' is neither a config file, a models:/ URI nor a key=value override"
            )
    return config, uris, overrides


def build_config(args):
    """KilnConfig with the serve section from the config file, the model URIs, overrides and
    flags."""
    from kiln.config import apply_overrides, read_yaml
    from kiln.schema import validate_config

    config, uris, overrides = split_targets(args.targets)
    data = apply_overrides(read_yaml(config) if config else {}, overrides)
    if data.get("serve") is None:
        data["serve"] = {}
    serve = data["serve"]
    if isinstance(serve, dict):  # anything else: validation below names the key
        if uris:
            serve["models"] = [*(serve.get("models") or []), *uris]
        for flag, key in (
            ("host", "host"),
            ("port", "port"),
            ("ingress", "ingress"),
            ("api_key_env", "api_key_env"),
            ("timeout", "start_timeout_s"),
            ("num_cpus", "num_cpus"),
        ):
            if getattr(args, flag) is not None:
                serve[key] = getattr(args, flag)
    return validate_config(data)


def _run_dir(args, cfg=None) -> str:
    return args.run_dir or (cfg.experiment.run_dir if cfg is not None else "runs")


def use_serving_env(run_dir: str, address: str | None, starting: bool = False) -> None:
    """Set what this CLI process needs before it imports Ray to reach what serves from
    ``run_dir`` (``RAY_AUTH_MODE=token`` for Kiln's local instance); a variable the user set is
    kept. The CLI is the entry point: library code only says what it needs (``serving_env``)."""
    from kiln.serve.cluster import serving_env

    for key, value in serving_env(run_dir, address, starting).items():
        os.environ.setdefault(key, value)


def serving_hooks(cfg: ServeConfig | None) -> ServingHooks:
    """The layers above serving plugged into ``kiln serve start | stop``: rollout records and
    controllers (``kiln.rollout.control``), the Kiln console under ``/console/``
    (``kiln.console``) and, when ``serve.monitor.retrain`` is set, the replicas' retraining loop
    (``kiln.monitor.retrain``)."""
    from kiln.console.server import console_factory
    from kiln.rollout.control.api import restore_rollouts, stop_controllers
    from kiln.serve.lifecycle import ServingHooks

    retrainer = None
    if cfg is not None and cfg.monitor.retrain is not None:
        from kiln.monitor.retrain.loop import RetrainLoop

        retrainer = RetrainLoop
    return ServingHooks(
        restore=restore_rollouts,
        on_stop=stop_controllers,
        retrainer=retrainer,
        console=console_factory,
    )


def _start(args) -> int:
    from kiln import tracking as trk
    from kiln.errors import ConfigError
    from kiln.serve.lifecycle import start_serving

    cfg = build_config(args)
    serve_cfg = cfg.serve
    run_dir = _run_dir(args, cfg)
    tracking_uri = args.tracking_uri or trk.resolve_tracking_uri(
        cfg.experiment.tracking_uri, run_dir
    )
    api_key = None
    if serve_cfg.api_key_env:
        api_key = os.environ.get(serve_cfg.api_key_env)
        if not api_key:
            raise ConfigError(
                f"serve.api_key_env names {serve_cfg.api_key_env}, but that environment variable "
                "is not set (or empty)"
            )
    use_serving_env(run_dir, args.address, starting=True)
    info = start_serving(
        serve_cfg,
        tracking_uri,
        run_dir,
        address=args.address,
        api_key=api_key,
        progress=lambda text: say(args, f"kiln serve: {text}"),
        debug=args.debug,
        hooks=serving_hooks(serve_cfg),
        warn=lambda text: print(f"warning: {text}", file=sys.stderr, flush=True),
    )
    where = (
        f"local Ray instance, pid {info.local_ray_pid}"
        if info.local_ray_pid
        else f"Ray at {info.ray_address}"
    )
    say(args, f"serving at {info.url}  (ingress: {info.ingress}; {where})")
    width = max(len(m.name) for m in info.models)
    for m in info.models:
        flag = " (default)" if m.default else ""
        say(args, f"  {m.name:<{width}}  v{m.version:<4} {m.format:<12} {m.infer_url}{flag}")
    if info.api_key_required:
        say(
            args,
            f"infer endpoints need the API key from ${serve_cfg.api_key_env} (header X-API-Key)",
        )
    if info.grpc_url:
        say(args, f"gRPC     {info.grpc_url}  (KServe v2 GRPCInferenceService)")
    if info.metrics_url:
        say(args, f"metrics  {info.metrics_url}")
    if info.console_url:
        say(
            args,
            f"console  {info.console_url}"
            + ("  (needs the API key)" if info.api_key_required else ""),
        )
    say(args, "stop with: kiln serve stop" + (f" --address {args.address}" if args.address else ""))
    if args.json:
        emit_json(info.to_dict())
    return 0


def _status(args) -> int:
    from kiln.serve.status import serving_status

    use_serving_env(_run_dir(args), args.address)
    st = serving_status(_run_dir(args), args.address, args.debug)
    where = (
        f"local Ray instance, pid {st.local_ray_pid}"
        if st.local_ray_pid
        else f"Ray at {st.ray_address}"
    )
    say(args, f"serving at {st.url}  (ingress: {st.ingress or 'unknown'}; {where})")
    for name, app in st.applications.items():
        replicas = (
            ", ".join(f"{n} {state.lower()}" for state, n in app["replicas"].items())
            or "no replicas"
        )
        say(
            args,
            f"  app {name:<20} {app['status']:<14} {replicas}"
            + (f"  {app['message']}" if app["message"] else ""),
        )
    for m in st.models:
        flag = " (default)" if m["default"] else ""
        say(
            args,
            f"  model {m['name']} v{m['version']}{flag}: {m['requests']} requests, {m['errors']} "
            "errors",
        )
    if st.metrics_url:
        say(args, f"metrics  {st.metrics_url}")
    if st.grpc_url:
        say(args, f"gRPC     {st.grpc_url}")
    if st.console_url:
        say(args, f"console  {st.console_url}")
    for error in st.errors:  # stderr under --json: the JSON line stays as documented
        say(args, f"warning: could not read the {error}")
    if args.json:
        emit_json(st.to_dict())
    return 0


def _stop(args) -> int:
    from kiln.serve.lifecycle import stop_serving

    use_serving_env(_run_dir(args), args.address)
    result = stop_serving(_run_dir(args), args.address, args.debug, hooks=serving_hooks(None))
    say(
        args,
        f"stopped {', '.join(result.stopped)}"
        + (
            f" and the local Ray instance (pid {result.local_ray_pid})"
            if result.local_ray_pid
            else ""
        ),
    )
    if args.json:
        emit_json(result.to_dict())
    return 0


def run(args: argparse.Namespace) -> int:
    return args._serve_run(args)
