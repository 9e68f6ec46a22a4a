"""kiln jobs list | status ID | logs ID [--follow] | stop ID   (jobs on a Ray cluster, by the Jobs
API)"""

from __future__ import annotations

from kiln.commands.common import add_json_argument, emit_json
from kiln.commands.submit import add_address_argument

HELP = "list, inspect, follow and stop jobs on a Ray cluster"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    for name, help_text in (
        ("list", "every job the cluster knows"),
        ("status", "one job's status"),
        ("logs", "one job's logs"),
        ("stop", "stop a running job and wait until it ended"),
    ):
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name != "list":
            cmd.add_argument(
                "submission_id", metavar="ID", help="the submission id (kiln submit prints it)"
            )
        if name == "logs":
            cmd.add_argument(
                "--follow", action="store_true", help="keep streaming until the job ends"
            )
        add_address_argument(cmd)
        if name != "logs":
            add_json_argument(cmd)
        cmd.set_defaults(_jobs_run=globals()[f"_{name}"])


def _when(ts: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _list(args, client) -> int:
    from kiln.cluster.jobs import list_jobs
    from kiln.train.report import format_table

    jobs = list_jobs(client)
    if args.json:
        emit_json({"jobs": [j.to_dict() for j in jobs]})
        return 0
    if not jobs:
        print(f"no jobs on {client.get_address()}")
        return 0
    rows = [
        {
            "id": j.submission_id,
            "status": j.status,
            "job": j.job or "-",
            "started": _when(j.start_time),
            "seconds": f"{j.end_time - j.start_time:.0f}" if j.end_time and j.start_time else "-",
        }
        for j in jobs
    ]
    print(format_table(rows, ["id", "status", "job", "started", "seconds"]))
    return 0


def _status(args, client) -> int:
    from kiln.cluster.jobs import job_logs, job_state, summary_line

    state = job_state(client, args.submission_id)
    summary = (
        summary_line(job_logs(client, args.submission_id)) if state.status == "SUCCEEDED" else None
    )
    if args.json:
        emit_json({**state.to_dict(), "summary": summary})
        return 0
    print(f"{state.submission_id}  {state.status}")
    print(f"  entrypoint  {state.entrypoint}")
    print(f"  started     {_when(state.start_time)}   ended {_when(state.end_time)}")
    if state.driver_exit_code is not None:
        print(f"  exit code   {state.driver_exit_code}")
    if state.message and state.message.strip():
        print(f"  message     {state.message.strip().splitlines()[0]}")
    return 0


def _logs(args, client) -> int:
    from kiln.cluster.jobs import follow_logs, job_logs, job_state, stdout_writer

    if args.follow:
        follow_logs(client, args.submission_id, stdout_writer(to_stderr=False))
    else:
        job_state(client, args.submission_id)  # a clear error for an unknown id
        print(job_logs(client, args.submission_id), end="")
    return 0


def _stop(args, client) -> int:
    from kiln.cluster.jobs import stop_job

    state = stop_job(client, args.submission_id)
    if args.json:
        emit_json(state.to_dict())
    else:
        print(f"{state.submission_id}  {state.status}")
    return 0


def run(args) -> int:
    from kiln.cluster.client import connect

    return args._jobs_run(args, connect(args.address, args.debug))
