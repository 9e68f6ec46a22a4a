"""kiln submit JOB CONFIG [key=value ...] [--address URL] [--follow] [--json] [--tracking-uri
URI]"""

from __future__ import annotations

from kiln.commands.common import add_config_arguments, add_json_argument, emit_json, say

# The jobs Kiln ships (jobs/JOB.py runs `kiln JOB CONFIG`): their CONFIG is a Kiln config.
KILN_JOBS = ("train", "tune", "compress")

HELP = "submit a job (jobs/JOB.py: train, ...) to a Ray cluster through the Ray Jobs API"


def add_address_argument(parser) -> None:
    parser.add_argument(
        "--address",
        metavar="URL",
        help="the cluster's Jobs API, http://HOST:8265 (default: RAY_API_SERVER_ADDRESS, "
        "RAY_ADDRESS, else the head from 'kiln cluster start', else http://127.0.0.1:8265)",
    )


def add_arguments(parser) -> None:
    parser.add_argument(
        "job", metavar="JOB", help="a job in the project's jobs/ folder, e.g. train"
    )
    add_config_arguments(parser)
    add_address_argument(parser)
    parser.add_argument(
        "--follow", action="store_true", help="stream the job's logs; exit 0 only when it SUCCEEDED"
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking server the job logs to, e.g. from 'kiln tracking serve' "
        "(default: MLFLOW_TRACKING_URI when it is an http(s) URI)",
    )
    parser.add_argument(
        "--working-dir",
        metavar="DIR",
        help="the project folder shipped to the cluster, holding jobs/ and configs/ (default: .)",
    )
    parser.add_argument(
        "--python",
        default="python",
        help="the Python the job runs with on the head (default: 'python' on the head's PATH)",
    )
    parser.add_argument(
        "--with-deps",
        action="store_true",
        help="also install kiln's requirements (all but ray and torch) into the job's environment",
    )
    parser.add_argument(
        "--include-secret-files",
        action="store_true",
        help="also upload .env, key and credential files from the working dir (excluded by "
        "default)",
    )
    parser.add_argument(
        "--submission-id", metavar="ID", help="the job's id (default: kiln-JOB-<random>)"
    )
    add_json_argument(parser)
    parser.epilog = (
        "--json waits for the job to end and prints its id, final status and its own JSON summary."
    )


def default_tracking_uri() -> str | None:
    import os

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri if uri.startswith(("http://", "https://")) else None


def job_env_vars(debug: bool) -> dict[str, str]:
    """Variables for the job's environment: --debug, and the tracking server's credentials when
    this shell has them (MLFLOW_TRACKING_USERNAME/PASSWORD: the job's MLflow client reads them;
    they go to no param, tag or log)."""
    import os

    from kiln.cluster.tracking_server import PASSWORD_ENV, USERNAME_ENV

    env = {"KILN_DEBUG": "1"} if debug else {}
    env.update({k: os.environ[k] for k in (USERNAME_ENV, PASSWORD_ENV) if os.environ.get(k)})
    return env


def run(args) -> int:
    from pathlib import Path

    from kiln.cluster.client import connect
    from kiln.cluster.jobs import (
        follow_logs,
        job_outcome,
        raise_unless_succeeded,
        stdout_writer,
        wait_until_finished,
    )
    from kiln.cluster.submit import build_runtime_env, job_spec, submit
    from kiln.schema import load_config

    spec = job_spec(args.job, args.config, args.overrides, args.working_dir, args.python)
    cfg = None
    if args.job in KILN_JOBS:  # catch config mistakes here, before anything is uploaded
        cfg = load_config(spec.project / spec.config, spec.overrides)
    client = connect(args.address, args.debug)
    address = client.get_address()
    tracking_uri = args.tracking_uri or default_tracking_uri()
    # --debug also reaches the job: its tracebacks and Ray's logs land in the job's logs.
    runtime_env = build_runtime_env(
        spec,
        tracking_uri,
        with_deps=args.with_deps,
        include_secret_files=args.include_secret_files,
        env_vars=job_env_vars(args.debug),
    )
    submission_id = submit(client, spec, runtime_env, args.submission_id)
    say(args, f"submitted {submission_id} to {address}: {spec.entrypoint()}")
    experiment = getattr(cfg, "experiment", None)
    if experiment is not None:
        if experiment.tracking_uri:
            say(
                args, f"tracking: {experiment.tracking_uri} (experiment.tracking_uri in the config)"
            )
        elif tracking_uri:
            say(args, f"tracking: {tracking_uri}")
        else:
            say(
                args,
                "tracking: no --tracking-uri: the cluster's MLFLOW_TRACKING_URI if its nodes set "
                "one, "
                "else a sqlite file in the job's working dir on the head, gone with the cluster "
                "(see 'kiln tracking serve')",
            )
        if not experiment.storage_path:
            where = (
                f"{experiment.run_dir}/checkpoints"
                if Path(experiment.run_dir).is_absolute()
                else f"{experiment.run_dir}/checkpoints in the job's working dir"
            )
            say(
                args,
                f"checkpoints: {where} on the head (on a cluster of several machines set "
                "experiment.storage_path to storage every node reaches)",
            )
    if not (args.follow or args.json):
        say(args, f"follow it with: kiln jobs logs {submission_id} --follow --address {address}")
        return 0
    if args.follow:
        follow_logs(client, submission_id, stdout_writer(to_stderr=args.json))
    wait_until_finished(client, submission_id)
    outcome = job_outcome(client, submission_id)
    if args.json:
        emit_json({**outcome.to_dict(), "address": address})
    else:
        say(args, f"job {submission_id} {outcome.status}")
    raise_unless_succeeded(outcome)
    return 0
