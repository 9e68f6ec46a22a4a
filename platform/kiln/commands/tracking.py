"""kiln tracking serve [--host 127.0.0.1] [--port 5000] [--dir runs/tracking]
[--credentials-file ~/.mlflow/credentials] | kiln tracking credentials [--file PATH]"""

from __future__ import annotations

import argparse

HELP = (
    "run an MLflow tracking server (sqlite store, artifacts served through it) for jobs on a "
    "cluster"
)


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="tracking_command", metavar="ACTION", required=True)
    serve = sub.add_parser("serve", help="run 'mlflow server' in the foreground (Ctrl-C stops it)")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1; a cluster's workers need one they reach)",
    )
    serve.add_argument("--port", type=int, default=5000)
    serve.add_argument(
        "--dir", default="runs/tracking", help="where the sqlite store and the artifacts live"
    )
    serve.add_argument("--workers", type=int, default=1, help="server worker processes")
    serve.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require credentials (MLflow's basic-auth app; default: on unless --host is loopback)",
    )
    serve.add_argument(
        "--credentials-file",
        metavar="PATH",
        help="MLflow's client credentials file whose user and password become the admin's "
        "(created when absent; implies --auth): a cluster's nodes get the same file",
    )
    serve.set_defaults(_tracking_run=_serve)
    creds = sub.add_parser(
        "credentials",
        help="create MLflow's client credentials file (0600) for a tracking server with "
        "authentication (never prints the password)",
    )
    creds.add_argument(
        "--file",
        default="~/.mlflow/credentials",
        help="where (default ~/.mlflow/credentials, which every MLflow client reads)",
    )
    creds.set_defaults(_tracking_run=_credentials)


def _credentials(args) -> int:
    from kiln.cluster.tracking_server import ensure_client_credentials

    path, created = ensure_client_credentials(args.file)
    print(
        f"{'created' if created else 'kept'} {path} (0600 in a 0700 folder; the password is "
        "not shown): cluster.yaml's file_mounts copy it to every node, where MLflow's clients "
        "read it"
    )
    return 0


def _serve(args) -> int:
    from kiln.cluster.tracking_server import exec_server, is_loopback, tracking_server

    server = tracking_server(
        args.host, args.port, args.dir, args.workers, args.auth, args.credentials_file
    )
    print(
        f"tracking server {server.uri}  (store {server.backend_store_uri}, artifacts "
        f"{server.artifacts_dir})"
    )
    print(f"submit jobs with: kiln submit JOB CONFIG --tracking-uri {server.uri}")
    if server.auth and server.client_credentials is not None:
        print(
            f"credentials required: user and password in {server.credentials_file} (0600), "
            "MLflow's client file: MLflow's clients on every machine that has a copy of it read "
            "it themselves"
        )
    elif server.auth:
        print(
            f"credentials required: user and password in {server.credentials_file} (0600); "
            "clients and kiln submit take them from MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD"
        )
    elif not is_loopback(args.host):
        print(
            "note: the server has no authentication; anyone who reaches this address can read and "
            "write runs"
        )
    exec_server(server)
    return 0  # not reached: exec replaced this process


def run(args) -> int:
    return args._tracking_run(args)
