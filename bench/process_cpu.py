"""Where a command's CPU goes, by kind of process: run COMMAND, sample every process on the machine
every 0.5 s (psutil), and print the core-seconds each kind used while it ran (Ray actors by class,
Ray's daemons, `kiln` subcommands, ...), with the count of processes and the CPU of each.

A process is named by the last command line it showed (Ray workers retitle themselves `ray::Class`
once they hold an actor or task). Processes that lived under one sampling interval are missed, and
the last interval of each process is lost: the totals are a little low, not inflated.

Usage: python bench/process_cpu.py [--out FILE.json] -- COMMAND ...
e.g.   python bench/process_cpu.py --out bench/out/suite_cpu.json -- make test
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import print_machine  # noqa: E402

SUBCOMMAND_GROUPS = {"serve", "rollout", "monitor", "cluster", "jobs"}
DAEMONS = (
    "gcs_server",
    "raylet/raylet",
    "dashboard/agent.py",
    "runtime_env/agent",
    "dashboard/dashboard.py",
    "log_monitor",
    "autoscaler/_private/monitor.py",
    "mlflow",
    "haproxy",
    "chromium",
)


def kind(cmds: list[str]) -> str:
    named = [c for c in cmds if c.startswith("ray::") and not c.startswith("ray::IDLE")]
    if named:
        return "ray::" + re.split(r"[ :(.]", named[-1][5:])[0]
    last = cmds[-1]
    if "default_worker.py" in last or last.startswith("ray::IDLE"):
        return "ray worker (no actor or task seen)"
    if last.startswith("ray-dashboard-"):
        return "ray dashboard module"
    cli = re.search(r"(?:kiln\.cli|bin/kiln)\s+([a-z-]+)(?:\s+([a-z-]+)\b)?", last)
    if cli:
        sub = (cli.group(2) or "") if cli.group(1) in SUBCOMMAND_GROUPS else ""
        return f"kiln {cli.group(1)} {sub}".strip()
    for daemon in DAEMONS:
        if daemon in last:
            return daemon
    if "exec(eval(sys.stdin.readline()))" in last:
        return "pytest-xdist worker"
    return last.split()[0].rsplit("/", 1)[-1] if last.strip() else "?"


def sample(seen: dict, start: float, stop: threading.Event, me: int) -> None:
    while not stop.is_set():
        for proc in psutil.process_iter():
            if proc.pid == me:
                continue
            try:
                created = proc.create_time()
                times = proc.cpu_times()
                cmd = " ".join(proc.cmdline())[:300]
            except (psutil.Error, OSError):
                continue
            entry = seen.setdefault(
                (proc.pid, created),
                # CPU a process had used before the command started is not the command's
                {"base": times.user + times.system if created < start else 0.0, "cmds": []},
            )
            entry["cpu"] = times.user + times.system
            # an exiting process shows no command line: keep the last one it showed (its short
            # kernel name only if it never showed one, e.g. a kernel thread)
            cmd = cmd or (entry["cmds"][-1] if entry["cmds"] else proc.name())
            if not entry["cmds"] or entry["cmds"][-1] != cmd:
                entry["cmds"].append(cmd)
        stop.wait(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no COMMAND")
    machine = print_machine()
    seen: dict = {}
    stop = threading.Event()
    start = time.time()
    sampler = threading.Thread(target=sample, args=(seen, start, stop, psutil.Process().pid))
    sampler.start()
    try:
        rc = subprocess.call(command)
    finally:
        stop.set()
        sampler.join()
    wall = time.time() - start
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for entry in seen.values():
        if "cpu" in entry:
            name = kind(entry["cmds"])
            totals[name] += entry["cpu"] - entry["base"]
            counts[name] += 1
    total = sum(totals.values())
    print(f"\n{total:.0f} core-seconds in {wall:.0f} s of wall time ({len(seen)} processes)")
    print(f"{'core-s':>8} {'share':>6} {'procs':>6} {'each':>6}  kind")
    for name, cpu in sorted(totals.items(), key=lambda kv: -kv[1])[:30]:
        print(f"{cpu:8.1f} {cpu / total:6.1%} {counts[name]:6d} {cpu / counts[name]:6.2f}  {name}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        rows = {name: {"core_s": totals[name], "processes": counts[name]} for name in totals}
        out = {"machine": machine, "wall_s": wall, "core_s": total, "kinds": rows}
        args.out.write_text(json.dumps(out, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
