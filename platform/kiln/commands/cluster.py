"""kiln cluster start | stop | status | validate CLUSTER_YAML"""

from __future__ import annotations

from kiln.commands.common import add_json_argument, emit_json, say

HELP = "a local Ray head (start, stop, status) and checks of cluster-launcher configs (validate)"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    start = sub.add_parser(
        "start", help="start a Ray head on this machine (Jobs API on 127.0.0.1, token auth on)"
    )
    start.add_argument("--num-cpus", type=float, help="CPUs the head offers (default: all)")
    start.add_argument("--num-gpus", type=int, help="GPUs the head offers (default: all)")
    start.add_argument("--resources", metavar="JSON", help="custom resources, e.g. '{\"head\": 1}'")
    start.add_argument(
        "--dashboard-port",
        type=int,
        default=8265,
        help="Jobs API and dashboard port (0: a free one)",
    )
    start.add_argument(
        "--node-ip-address", metavar="IP", help="the address other nodes reach the head at"
    )
    add_json_argument(start)
    start.set_defaults(_cluster_run=_start)
    stop = sub.add_parser(
        "stop", help="stop the head 'kiln cluster start' started (and nothing else)"
    )
    add_json_argument(stop)
    stop.set_defaults(_cluster_run=_stop)
    status = sub.add_parser("status", help="whether the head runs, its addresses and nodes")
    add_json_argument(status)
    status.set_defaults(_cluster_run=_status)
    validate = sub.add_parser(
        "validate", help="check a Ray cluster-launcher config (ray up) with Ray's validator"
    )
    validate.add_argument("path", metavar="CLUSTER_YAML")
    add_json_argument(validate)
    validate.set_defaults(_cluster_run=_validate)


def _resources(text: str | None) -> dict[str, float] | None:
    import json

    from kiln.errors import KilnError

    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise KilnError(f"--resources {text}: not JSON (e.g. '{{\"head\": 1}}')") from None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
        raise KilnError(f"--resources {text}: give a JSON object of name: amount")
    return {str(k): float(v) for k, v in value.items()}


def _start(args) -> int:
    from kiln.cluster.local import start_local_cluster, state_path

    say(args, "starting a Ray head (token authentication on)...")
    cluster = start_local_cluster(
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        resources=_resources(args.resources),
        dashboard_port=args.dashboard_port,
        node_ip_address=args.node_ip_address,
    )
    say(
        args,
        f"Jobs API   {cluster.dashboard_url}    (kiln submit --address {cluster.dashboard_url})",
    )
    say(
        args,
        f"GCS        {cluster.gcs_address}    (add a node: RAY_AUTH_MODE=token ray start --address "
        f"{cluster.gcs_address})",
    )
    say(args, f"pid        {cluster.pid}, state in {state_path()}, logs in {cluster.temp_dir}")
    if args.json:
        emit_json(cluster.to_dict())
    return 0


def _stop(args) -> int:
    from kiln.cluster.local import stop_local_cluster

    cluster = stop_local_cluster()
    if args.json:
        emit_json({"stopped": cluster is not None, **(cluster.to_dict() if cluster else {})})
    elif cluster is None:
        print("no cluster started by 'kiln cluster start': nothing to stop")
    else:
        print(f"stopped the Ray head (pid {cluster.pid}, {cluster.dashboard_url})")
    return 0


def _status(args) -> int:
    from kiln.cluster.local import local_cluster_status

    status = local_cluster_status()
    if args.json:
        emit_json(status.to_dict())
        return 0
    if not status.running:
        print("not running (start one with 'kiln cluster start')")
        return 0
    c = status.cluster
    assert c is not None  # a running head is a recorded one
    print(f"running    Ray {status.ray_version}, pid {c.pid}")
    print(f"Jobs API   {c.dashboard_url}")
    print(f"GCS        {c.gcs_address}")
    for n in status.nodes:
        res = ", ".join(
            f"{v:g} {k}"
            for k, v in sorted(n.resources.items())
            if not k.startswith("node:") and k not in ("memory", "object_store_memory")
        )
        print(
            f"node       {n.node_id[:12]}  {n.node_ip:15}  {'head' if n.is_head else 'worker':6}  "
            f"{'alive' if n.alive else 'dead':5}  {res}"
        )
    return 0


def _validate(args) -> int:
    from kiln.cluster.launcher import validate_cluster_config

    summary = validate_cluster_config(args.path, verbose=args.debug)
    if args.json:
        emit_json(summary.to_dict())
        return 0
    print(
        f"{args.path}: ok (cluster '{summary.cluster_name}' on {summary.provider}, head "
        f"'{summary.head_node_type}', "
        f"up to {summary.max_workers} workers)"
    )
    for t in summary.node_types:
        kind = t.node_config.get("InstanceType") or t.node_config.get("machineType") or ""
        print(f"  {t.name:12} {kind:14} min {t.min_workers}  max {t.max_workers}")
    return 0


def run(args) -> int:
    return args._cluster_run(args)
