"""Where the time of `kiln rollout start` goes, on Kiln's local serving instance.

Registers a digits CNN twice (v1, v2; random weights), serves v1 with `kiln serve start` (its own
local Ray instance, which also starts the model's rollout controller), then, for each round: times
`kiln rollout start digits-cnn --to 2` end to end (the CLI as a user runs it), rolls back, and times
the same call's phases in a fresh process (import of the control plane, Ray connection, the
controller's answer, which includes its registry check of the version). To compare with an older
checkout, run its own copy of this script right before or after (a CLI and a controller of two
versions do not mix on one instance).

    PYTHONPATH=platform python bench/rollout_start.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "platform"))

from machine import print_machine  # noqa: E402
from rollout_latency import MODEL, kiln, register  # noqa: E402

PHASES = """
import json, sys, time
t0 = time.perf_counter()
from kiln.cli import configure_process
configure_process()
from kiln.commands.serve import use_serving_env
use_serving_env(sys.argv[1], None)  # as the CLI does, before Ray is imported
from kiln.rollout.control import api
from kiln.rollout.core.spec import RolloutOptions
t1 = time.perf_counter()
run_dir, model = sys.argv[1], sys.argv[2]
api.connect_to_serving(run_dir, None)
t2 = time.perf_counter()
api.start_rollout(run_dir, None, model, "2", "canary", RolloutOptions(weight=10, bake_s=3600))
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "connect": t2 - t1, "controller": t3 - t2}))
"""


def cli(*args: str, env: dict) -> float:
    full_env = dict(os.environ, PYTHONPATH=str(REPO / "platform"), **env)
    full_env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise SystemExit(f"kiln {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print_machine()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-rollout-start-"))
    run_dir = work / "runs"
    tracking_uri, (v1, _) = register(run_dir)
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    kiln(
        "serve",
        "start",
        v1,
        "serve.deployment.num_cpus=0.5",
        "--port",
        "0",
        "--num-cpus",
        "2",
        "--run-dir",
        str(run_dir),
        env=env,
    )
    start = ["rollout", "start", MODEL, "--to", "2", "--strategy", "canary", "--bake", "1h"]
    rollback = ["rollout", "rollback", MODEL, "--run-dir", str(run_dir)]
    try:
        for r in range(args.rounds):
            seconds = cli(*start, "--run-dir", str(run_dir), env=env)
            print(f"round {r + 1}: kiln rollout start {seconds:5.2f} s", flush=True)
            cli(*rollback, env=env)
            full_env = dict(os.environ, PYTHONPATH=str(REPO / "platform"), **env)
            full_env.pop("RAY_ADDRESS", None)
            proc = subprocess.run(
                [sys.executable, "-c", PHASES, str(run_dir), MODEL],
                env=full_env,
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
            )
            phases = json.loads(proc.stdout.strip().splitlines()[-1])
            cli(*rollback, env=env)
            print(
                f"round {r + 1}: in-process phases: "
                + ", ".join(f"{k} {v:5.2f} s" for k, v in phases.items()),
                flush=True,
            )
    finally:
        kiln("serve", "stop", "--run-dir", str(run_dir), env=env)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
