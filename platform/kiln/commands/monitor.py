"""kiln monitor status MODEL [--version V] [--json] | kiln monitor report MODEL [--out DIR]"""

from __future__ import annotations

import argparse
import os

from kiln.commands.common import add_json_argument, emit_json, say

HELP = "live monitoring of served models: drift, out-of-distribution rate, alerts"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="monitor_command", metavar="ACTION", required=True)
    status = sub.add_parser(
        "status", help="drift score, drifted features, OOD rate and alerts per served version"
    )
    status.set_defaults(_monitor_run=_status)
    report = sub.add_parser(
        "report", help="HTML report with PNG plots: live window against the reference"
    )
    report.add_argument("--out", help="output folder (default RUN_DIR/monitor/MODEL)")
    report.set_defaults(_monitor_run=_report)
    for cmd in (status, report):
        cmd.add_argument("model", metavar="MODEL", help="served model name")
        cmd.add_argument("--version", help="one served version (default: all)")
        cmd.add_argument(
            "--url", help="serving URL (default: the one `kiln serve start` recorded in RUN_DIR)"
        )
        cmd.add_argument(
            "--address",
            help="Ray cluster that serves (default: RAY_ADDRESS, else RUN_DIR's record)",
        )
        cmd.add_argument(
            "--run-dir", default="runs", help="where the serving state is kept (default 'runs')"
        )
        cmd.add_argument(
            "--api-key-env", metavar="VAR", help="environment variable holding the server's API key"
        )
        cmd.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
        )
        add_json_argument(cmd)


def run(args) -> int:
    return args._monitor_run(args)


def _fetch(args, window: bool) -> dict:
    from kiln.errors import ConfigError
    from kiln.monitor.console.client import fetch_monitor, serving_url

    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise ConfigError(
                f"--api-key-env names {args.api_key_env}, but that environment variable is not set"
            )
    if window and key is None and not args.url:
        # without a key the server gives the window (raw rows, reference statistics) to nobody
        # over HTTP: read it through Ray, whose token guards it
        from kiln.commands.serve import use_serving_env
        from kiln.monitor.console.client import monitor_through_ray

        use_serving_env(args.run_dir, args.address)
        return monitor_through_ray(args.run_dir, args.address, args.model, args.version, args.debug)
    url = serving_url(args.run_dir, args.address, args.url, args.debug)
    return fetch_monitor(url, args.model, args.version, window, key)


def _status(args) -> int:
    report = _fetch(args, window=False)
    say(args, f"model {report['model']} (replica {report['replica']}; windows are per replica)")
    for version, st in report["versions"].items():
        if not st.get("monitored"):
            say(args, f"  v{version}: warning: not monitored: {st.get('reason')}")
            continue
        drift, ood, window = st["drift"], st["ood"], st["window"]
        score = "n/a" if drift["score"] is None else f"{drift['score']:.3f}"
        rate = "n/a" if ood["window_rate"] is None else f"{ood['window_rate']:.3f}"
        flags = [
            name for name, on in (("DRIFT", drift["alerting"]), ("OOD", ood["alerting"])) if on
        ]
        say(
            args,
            f"  v{version}: window {window['rows']}/{window['capacity']} rows; drift {score} "
            f"(alert > {drift['threshold']:g}); OOD rate {rate} (alert > "
            f"{ood['alert_threshold']:g})" + (f"  ALERT: {', '.join(flags)}" if flags else ""),
        )
        if drift.get("drifted"):
            say(args, f"      drifted: {', '.join(drift['drifted'])}")
        for event in (st.get("retrain") or {}).get("events", [])[-5:]:
            detail = " ".join(f"{k}={v}" for k, v in event["detail"].items())
            job = f" {event['submission_id']}" if event.get("submission_id") else ""
            say(args, f"      retrain {event['step']}{job} {detail}".rstrip())
    if args.json:
        emit_json(report)
    return 0


def _report(args) -> int:
    from pathlib import Path

    from kiln.monitor.console.report import write_report

    report = _fetch(args, window=True)
    out = Path(args.out or Path(args.run_dir) / "monitor" / args.model)
    paths = write_report(report, out)
    say(args, f"report: {paths['html']}")
    if args.json:
        emit_json({k: str(v) for k, v in paths.items()})
    return 0
