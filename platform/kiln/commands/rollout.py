"""kiln rollout start|status|promote|rollback|pause|resume|history MODEL"""

from __future__ import annotations

import argparse
import time

from kiln.commands.common import add_json_argument, emit_json, say

HELP = (
    "roll a served model out to a new version: canary, linear, blue-green or shadow, gated by live "
    "metrics"
)


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    start = sub.add_parser("start", help="start rolling MODEL out to a registry version")
    start.add_argument("model", metavar="MODEL", help="served model name")
    start.add_argument(
        "--to", required=True, metavar="VERSION", help="registry version to roll out"
    )
    start.add_argument(
        "--strategy", required=True, choices=["canary", "linear", "blue-green", "shadow"]
    )
    start.add_argument(
        "--weight",
        type=float,
        metavar="PCT",
        help="canary: share to the new version (default 5); shadow: share mirrored (default 10)",
    )
    start.add_argument(
        "--steps", metavar="10,25,50,100", help="linear: shares per step (default 10,25,50,100)"
    )
    start.add_argument(
        "--bake",
        default="60s",
        metavar="DURATION",
        help="time at each step, e.g. 30s, 5m (default 60s)",
    )
    start.add_argument(
        "--interval", default="5s", metavar="DURATION", help="gate evaluation interval (default 5s)"
    )
    start.add_argument(
        "--gate",
        action="append",
        metavar="EXPR",
        help="repeatable: error_rate<0.01, p99_ms<200, agreement>0.9 (shadow), ... "
        "(default: error_rate<0.01)",
    )
    start.add_argument(
        "--sticky-header",
        metavar="NAME",
        help="requests with the same value of this header get the same version",
    )
    start.set_defaults(_rollout_run=_start)
    status = sub.add_parser("status", help="weights, per-version metrics and gate values")
    status.add_argument("model", metavar="MODEL")
    status.add_argument(
        "--watch",
        action="store_true",
        help="refresh until the rollout ends (Ctrl-C stops watching)",
    )
    status.set_defaults(_rollout_run=_status)
    actions = {}
    for action, text in (
        ("promote", "send all traffic to the new version now and move the 'champion' alias"),
        (
            "rollback",
            "send all traffic back to the stable version (after a promotion: to the "
            "previous champion)",
        ),
        ("pause", "hold the current step (gates keep being evaluated)"),
        ("resume", "continue a paused rollout (the step bakes again)"),
    ):
        actions[action] = sub.add_parser(action, help=text)
        actions[action].add_argument("model", metavar="MODEL")
        actions[action].set_defaults(_rollout_run=_action, _action=action)
    history = sub.add_parser("history", help="the audit log: every gate evaluation and decision")
    history.add_argument("model", metavar="MODEL")
    history.set_defaults(_rollout_run=_history)
    for cmd in (start, status, history, *actions.values()):
        cmd.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
        )
        cmd.add_argument(
            "--address",
            help="Ray cluster address (default: RAY_ADDRESS, else the one in "
            "RUN_DIR/serve/state.json)",
        )
        cmd.add_argument(
            "--run-dir",
            default="runs",
            help="where serving and rollout state is kept (default: runs)",
        )
        add_json_argument(cmd)


def _start(args) -> int:
    from kiln.commands.serve import use_serving_env
    from kiln.rollout.control.api import start_rollout
    from kiln.rollout.core.spec import DEFAULT_GATES, RolloutOptions, parse_duration, parse_steps

    options = RolloutOptions(
        weight=args.weight,
        steps=parse_steps(args.steps) if args.steps else None,
        bake_s=parse_duration(args.bake, "--bake"),
        interval_s=parse_duration(args.interval, "--interval"),
        gates=args.gate or list(DEFAULT_GATES),
        sticky_header=args.sticky_header,
    )
    use_serving_env(args.run_dir, args.address)
    record = start_rollout(
        args.run_dir,
        args.address,
        args.model,
        args.to,
        args.strategy,
        options,
        trigger="user",
        debug=args.debug,
    )
    steps = ", ".join(f"{s:g}%" for s in record.steps)
    say(
        args,
        f"rollout of {record.model}: v{record.stable} -> v{record.candidate} ({record.strategy}; "
        "steps "
        f"{steps}; bake {record.bake_s:g}s; gates {', '.join(record.gates) or 'none'} every "
        f"{record.interval_s:g}s)",
    )
    say(args, f"watch it with: kiln rollout status {record.model} --watch --run-dir {args.run_dir}")
    if args.json:
        emit_json(record.to_dict())
    return 0


def _status(args) -> int:
    from kiln.commands.serve import use_serving_env
    from kiln.rollout.control.api import rollout_status
    from kiln.rollout.core.store import ACTIVE

    use_serving_env(args.run_dir, args.address)
    while True:
        st = rollout_status(args.run_dir, args.address, args.model, args.debug)
        if args.json and not args.watch:
            emit_json(st.to_dict())
            return 0
        say(args, render_status(st))
        if not args.watch or (st.record or {}).get("phase") not in ACTIVE:
            if args.json:
                emit_json(st.to_dict())
            return 0
        try:
            time.sleep(max(0.5, min(float((st.record or {}).get("interval_s", 2.0)), 5.0)))
        except KeyboardInterrupt:
            return 0


def render_status(st) -> str:
    """The rollout status for people: phase, weights, last interval's metrics, gates."""
    from kiln.rollout.core.store import ACTIVE

    r = st.record or {}
    active = r.get("phase") in ACTIVE
    lines = [
        f"{r.get('model')}: {r.get('phase')}  stable v{r.get('stable')}"
        + (
            f"  candidate v{r.get('candidate')} ({r.get('strategy')})"
            if active
            else f"  (last rollout: {r.get('strategy')} to v{r.get('candidate')})"
            if r.get("candidate")
            else ""
        )
        + ("" if st.live else "  [controller not answering: persisted state]")
    ]
    if active:
        steps = r.get("steps") or []
        lines.append(
            f"  weights: v{r['stable']} {100 - r['weight']:g}%  v{r['candidate']} {r['weight']:g}%"
            + (f"  (mirrored {r['shadow']:g}%)" if r.get("shadow") else "")
            + f"  step {r['step'] + 1}/{len(steps)}"
            + f"  baked {r.get('baked_s', 0):.1f}/{r['bake_s']:g}s"
            + (
                f"  replica restarts: {', '.join(f'v{v} {n}' for v, n in r['restarts'].items())}"
                if r.get("restarts")
                else ""
            )
        )
    elif r.get("reason"):
        lines.append(f"  {r['reason']}")
    if active and st.replicas and r.get("candidate"):
        # the candidate's loading, per replica (the record stays 'preparing' until all have it)
        states = [str(ready.get(r["candidate"], "loading")) for ready in st.replicas.values()]
        odd = sorted({s for s in states if s not in ("ready", "loading")})
        lines.append(
            f"  v{r['candidate']} on replicas: {states.count('ready')}/{len(states)} ready"
            + (f", {states.count('loading')} loading" if "loading" in states else "")
            + "".join(f"; {s}" for s in odd)
        )
    for version, m in sorted(st.metrics.items()):
        lines.append(
            f"  v{version}: {m['requests']} req, errors {_pct(m['error_rate'])}, p50 "
            f"{_ms(m['p50_ms'])}, "
            f"p99 {_ms(m['p99_ms'])}"
            + (f" ({m['lost']} lost with a dead replica)" if m.get("lost") else "")
            + (f", agreement {_pct(m['agreement'])}" if m.get("compared") else "")
            + "".join(f", {k} {v:.3g}" for k, v in m.get("signals", {}).items())
            + (
                f"  (not gated: {m.get('pinned', 0)} pinned, {m.get('client_errors', 0)} 4xx)"
                if m.get("pinned") or m.get("client_errors")
                else ""
            )
        )
    for name, g in st.gates.items():
        state = {True: "pass", False: "FAIL", None: "no data"}[g["ok"]]
        value = "-" if g["value"] is None else f"{g['value']:.4g}"
        lines.append(f"  gate {name}: {value} {state}")
    return "\n".join(lines)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _action(args) -> int:
    from kiln.commands.serve import use_serving_env
    from kiln.rollout.control.api import rollout_command

    use_serving_env(args.run_dir, args.address)
    record = rollout_command(
        args.run_dir, args.address, args.model, args._action, trigger="user", debug=args.debug
    )
    say(
        args,
        f"{record.model}: {record.phase}; stable v{record.stable}"
        + (f" ({record.reason})" if record.reason else ""),
    )
    if args.json:
        emit_json(record.to_dict())
    return 0


def _history(args) -> int:
    from kiln.rollout.control.api import rollout_history

    entries = rollout_history(args.run_dir, args.model)
    for e in entries:
        when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
        weights = " ".join(f"v{v}={w:g}%" for v, w in e.get("weights", {}).items())
        gates = " ".join(
            f"{n}={'-' if g['value'] is None else format(g['value'], '.4g')}"
            for n, g in (e.get("gates") or {}).items()
        )
        say(
            args,
            f"{when} step {e.get('step')} {e['decision']:<9} [{e.get('trigger')}] {weights}"
            + (f"  {gates}" if gates else "")
            + (f"  {e['reason']}" if e.get("reason") else ""),
        )
    if args.json:
        emit_json({"model": args.model, "entries": entries})
    return 0


def run(args: argparse.Namespace) -> int:
    return args._rollout_run(args)
