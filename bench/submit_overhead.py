"""What submitting a job to a Ray cluster costs, against running the same job locally, in one run.

Same tiny training job (digits CNN, width 8, 2 epochs, 2 workers at 0.5 CPU), alternating each
round:
1. local: ``kiln train`` (starts its own Ray instance, sqlite tracking store), wall time;
2. submitted: ``kiln submit --follow --json`` to a head from ``kiln cluster start`` (2 CPUs, already
   running), tracked by ``kiln tracking serve``: wall time, and the time until the job's driver
   printed its first line (upload, runtime env, job supervisor, driver start-up).
Both also report the time until their first line of output: ``kiln train: ...`` (printed after the
config is loaded, before Ray starts). Medians over rounds; the ratio is submitted / local.

    python bench/submit_overhead.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kiln.local_ray import free_port, stop_session  # noqa: E402
from machine import print_machine  # noqa: E402

CONFIG = "configs/train/digits_cnn.yaml"
TINY = ["model.width=8", "train.epochs=2", "train.workers=2", "train.cpus_per_worker=0.5"]


def timed(cmd: list[str], env: dict[str, str], first_line: str) -> tuple[float, float, str]:
    """Run ``cmd``; returns (seconds to the first output line starting with ``first_line``, total
    seconds, stdout). Both streams are read line by line as they come."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if first is None and line.startswith(first_line):
            first = time.perf_counter() - start
    proc.wait()
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd[3:6])} failed ({proc.returncode}):\n{''.join(lines[-20:])}"
        )
    return first if first is not None else float("nan"), total, "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print_machine()

    home = Path(
        tempfile.mkdtemp(prefix="kiln-bench-", dir="/tmp")
    )  # its own Ray token and cluster state
    env = {
        **os.environ,
        "HOME": str(home),
        "KILN_HOME": str(home / ".kiln"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(REPO / "platform"),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3",
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    kiln = [sys.executable, "-m", "kiln.cli"]
    port = free_port()
    tracking = subprocess.Popen(
        [*kiln, "tracking", "serve", "--port", str(port), "--dir", str(home / "tracking")],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        head = subprocess.run(
            [*kiln, "cluster", "start", "--num-cpus", "2", "--dashboard-port", "0", "--json"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if head.returncode != 0:
            raise SystemExit(head.stderr)
        address = json.loads(head.stdout.strip().splitlines()[-1])["dashboard_url"]
        uri = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        print(f"# head {address}, tracking {uri}, {args.rounds} rounds, job: {' '.join(TINY)}")
        local_cmd = [*kiln, "train", CONFIG, *TINY, f"experiment.run_dir={home / 'local'}"]
        submit_cmd = [
            *kiln,
            "submit",
            "train",
            CONFIG,
            *TINY,
            "--address",
            address,
            "--tracking-uri",
            uri,
            "--follow",
            "--json",
        ]
        rows: dict[str, list[tuple[float, float]]] = {"local": [], "submitted": []}
        for r in range(args.rounds):
            order = ["local", "submitted"] if r % 2 == 0 else ["submitted", "local"]
            for kind in order:
                cmd = local_cmd if kind == "local" else submit_cmd
                first, total, out = timed(cmd, env, "kiln train:")
                if kind == "submitted":
                    assert json.loads(out.strip().splitlines()[-1])["status"] == "SUCCEEDED"
                rows[kind].append((first, total))
                print(
                    f"round {r + 1} {kind:9}  first line {first:6.1f} s   total {total:6.1f} s",
                    flush=True,
                )
        med = {
            k: (statistics.median(f for f, _ in v), statistics.median(t for _, t in v))
            for k, v in rows.items()
        }
        print()
        print(f"{'':10} {'first line (s)':>15} {'total (s)':>10}")
        for kind, (first, total) in med.items():
            print(f"{kind:10} {first:15.1f} {total:10.1f}")
        print(
            f"{'submitted/local':>15} {med['submitted'][0] / med['local'][0]:10.2f} "
            f"{med['submitted'][1] / med['local'][1]:10.2f}"
        )
        print(
            "submission overhead until the driver runs: "
            f"{med['submitted'][0] - med['local'][0]:+.1f} s (median)"
        )
    finally:
        subprocess.run(
            [*kiln, "cluster", "stop"], cwd=REPO, env=env, capture_output=True, timeout=120
        )
        stop_session(tracking.pid, None, timeout=5)
        tracking.wait(timeout=10)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
