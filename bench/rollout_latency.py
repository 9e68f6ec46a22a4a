"""Latency the rollout routing adds, side by side in one run: routed vs. one version served
directly.

One digits CNN (random weights, registered twice: v1 and v2) served by `kiln serve start` (a local
Ray instance, the chosen ingress: HAProxy on loopback by default, as `kiln serve start`).
Configurations, each measured at concurrency 1 (latency) and 8:

  (a) direct: POST /v2/models/M/versions/1/infer (the version named in the path, no routing
      decision)
  (b) routed, no rollout: POST /v2/models/M/infer (the default version)
  (c) routed, canary at 50% (v1 -> v2), no sticky header: a weighted choice per request
  (d) routed, canary at 50% with a sticky header (a hash of the header value per request)
  (e) routed, shadow mirroring 100% of requests to v2 (the mirrored call runs after the answer)
  (f) direct to the candidate during the canary: POST /v2/models/M/versions/2/infer (a rollout's
      candidate runs in its own process beside the replica: every request of it pays that hop)

Also, in-process: the cost of the routing decision itself (``RolloutAgent.route`` + ``record``, what
a request pays in the replica), per call, without and with a canary table and a sticky header; and
the hop to a candidate's own process (``kiln.models.isolated_runtime``): one model call of the
digits CNN in this process vs. in a child process, at batch 1 and 8.

Phases: no rollout [(a), (b)], canary [(a), (c), (d)], shadow [(a), (e)]; (a) is measured again in
every phase and the added latency is each configuration's p50/p99 minus (a)'s in the same phase,
over interleaved rounds (medians), because the machine is shared. The load generator
(bench/loadgen.py) runs in this process, on loopback only, bounded in requests and time.

    PYTHONPATH=platform python bench/rollout_latency.py [--rounds 5] [--ingress haproxy|proxy]
    [--quick]
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "platform"))

from loadgen import run_load  # noqa: E402
from machine import print_machine  # noqa: E402
from serve_latency import body_for  # noqa: E402

MODEL = "digits-cnn"
SHAPE = [1, 8, 8]
BOUNDS = [(1, 400, 5.0), (8, 1500, 6.0)]  # (concurrency, max requests, max seconds)


def register(run_dir: Path) -> tuple[str, list[str]]:
    import torch

    from kiln import tracking as trk
    from kiln.data.preprocess import Preprocessing
    from kiln.models.artifact import build_model, save_artifact
    from kiln.models.spec import ModelSpec

    uri = trk.default_tracking_uri(run_dir)
    exp = trk.ensure_experiment(uri, "bench-rollout", run_dir)
    prep = Preprocessing(kind="image", mean=[0.5], std=[0.25], channels=1, image_size=SHAPE[1:])
    uris = []
    for seed in (0, 1):
        spec = ModelSpec(
            "cnn", {"width": 32, "dropout": 0.1}, SHAPE, labels=list(range(10)), preprocessing=prep
        )
        torch.manual_seed(seed)
        directory = save_artifact(build_model(spec).eval(), spec, run_dir / "src" / f"v{seed}")
        run_id = trk.start_run(uri, exp, f"bench-v{seed}", {trk.TAG_JOB: "bench"})
        trk.log_artifacts(uri, run_id, directory, trk.MODEL_ARTIFACT_PATH)
        trk.end_run(uri, run_id)
        uris.append(f"models:/{MODEL}/{trk.register_model(uri, MODEL, run_id)}")
    return uri, uris


def kiln(*args: str, env: dict | None = None) -> dict:
    full_env = dict(os.environ, PYTHONPATH=str(REPO / "platform"), **(env or {}))
    full_env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args, "--json"],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise SystemExit(f"kiln {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(url: str, configs: dict, rounds: int, scale: float, phase: str, results: dict) -> None:
    body = body_for(SHAPE)
    for path, headers in configs.values():  # warm-up
        run_load(url, path, body, 4, 100, 10.0, headers)
    for r in range(rounds):
        for label, (path, headers) in configs.items():
            for concurrency, max_requests, max_seconds in BOUNDS:
                res = run_load(
                    url,
                    path,
                    body,
                    concurrency,
                    max(concurrency, int(max_requests * scale)),
                    max_seconds * scale + 1,
                    headers,
                )
                results.setdefault(f"{phase}|{label}|{concurrency}", []).append(res.to_dict())
                print(
                    f"  {phase:<10} round {r + 1} {label:<34} c={concurrency}  "
                    f"{res.throughput:7.1f} req/s  "
                    f"p50 {res.p50_ms:6.2f} ms  p99 {res.p99_ms:7.2f} ms  errors {res.errors}",
                    flush=True,
                )


def decision_cost(calls: int = 200_000) -> dict[str, float]:
    """Microseconds per request of the replica's routing decision plus its bookkeeping,
    in-process."""
    from kiln.rollout.core.inflight import InflightJournal, journal_path
    from kiln.rollout.core.replica import RolloutAgent, no_quality_signals
    from kiln.rollout.core.routing import RoutingTable

    async def noop(version, uri):
        return None

    out = {}
    tables = {
        "no rollout": None,
        "canary 50%": RoutingTable(stable="1", candidate="2", weight=50.0),
        "canary 50%, sticky": RoutingTable(
            stable="1", candidate="2", weight=50.0, sticky_header="x-user"
        ),
        "shadow 100%": RoutingTable(stable="1", candidate="2", shadow=100.0),
    }
    headers = {"x-user": "user-42", "content-type": "application/json"}
    folder = Path(tempfile.mkdtemp(prefix="kiln-bench-inflight-"))
    cases = [(label, table, False) for label, table in tables.items()]
    # the replica's in-flight file (issue 17): two counter writes in a memory map per request
    cases += [(f"{label} + in-flight", table, True) for label, table in tables.items()]
    agents = {}
    for label, table, inflight in cases:
        agent = agents[label] = RolloutAgent(MODEL, "1", ["1", "2"], noop, no_quality_signals)
        agent.table = table
        if inflight:  # outside a replica the agent keeps none: give it one
            agent.inflight = InflightJournal(journal_path(folder, MODEL, label.replace(" ", "_")))
    for _ in range(5):  # interleaved rounds, best of each (the machine is shared)
        for label, agent in agents.items():
            started = time.perf_counter()
            for _ in range(calls):
                version = agent.route(headers)
                agent.begin(version)
                agent.mirror_to(version)
                agent.end(version)
                agent.record(version, 200, 1.0)
            spent = (time.perf_counter() - started) / calls * 1e6
            out[label] = min(out.get(label, float("inf")), spent)
            agent.windows.clear()
    for label, agent in agents.items():
        agent.close()
        print(f"  decision + bookkeeping, {label:<32} {out[label]:6.2f} us per request", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    return out


def isolation_cost(calls: int = 2000) -> dict[str, float]:
    """Microseconds per model call of the digits CNN in this process vs. in its own child process
    (the hop a rollout's candidate pays), at batch 1 and 8: interleaved rounds, best of each."""
    import numpy as np
    import torch

    from kiln.data.preprocess import Preprocessing
    from kiln.models.artifact import build_model, save_artifact
    from kiln.models.predictor import load_isolated_predictor, load_predictor
    from kiln.models.spec import ModelSpec

    folder = Path(tempfile.mkdtemp(prefix="kiln-bench-isolated-"))
    prep = Preprocessing(kind="image", mean=[0.5], std=[0.25], channels=1, image_size=SHAPE[1:])
    spec = ModelSpec("cnn", {"width": 32, "dropout": 0.1}, SHAPE, list(range(10)), prep)
    torch.manual_seed(0)
    directory = save_artifact(build_model(spec).eval(), spec, folder / "model")
    torch.set_num_threads(1)  # as the benchmark's replica (serve.deployment.threads=1)
    predictors = {
        "in process": load_predictor(directory),
        "own process": load_isolated_predictor(directory, "bench"),
    }
    out: dict[str, float] = {}
    try:
        for _ in range(5):
            for batch in (1, 8):
                x = np.random.default_rng(0).standard_normal((batch, *SHAPE)).astype(np.float32)
                for label, predictor in predictors.items():
                    started = time.perf_counter()
                    for _ in range(calls):
                        predictor.logits(x)
                    spent = (time.perf_counter() - started) / calls * 1e6
                    key = f"{label}, batch {batch}"
                    out[key] = min(out.get(key, float("inf")), spent)
    finally:
        predictors["own process"].close()
        shutil.rmtree(folder, ignore_errors=True)
    for batch in (1, 8):
        local, isolated = out[f"in process, batch {batch}"], out[f"own process, batch {batch}"]
        print(
            f"  model call, batch {batch}: in process {local:7.1f} us, own process "
            f"{isolated:7.1f} us (hop {isolated - local:+.1f} us, ratio {isolated / local:.2f})",
            flush=True,
        )
    return out


def wait_rollout_running(run_dir: Path, timeout: float = 120.0) -> None:
    from kiln.rollout.core.store import RolloutStore

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = RolloutStore(run_dir, MODEL).load()
        if record is not None and record.phase == "running":
            time.sleep(1.5)  # replicas fetch the table every 0.5 s
            return
        time.sleep(0.2)
    raise SystemExit("the rollout did not start running")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--ingress",
        choices=["haproxy", "proxy"],
        default="haproxy",
        help="Kiln's ingress: 'haproxy' (the default of kiln serve start) or 'proxy' (the option)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="two rounds, a quarter of the requests"
    )
    parser.add_argument("--out", default=str(HERE / "out" / "rollout_latency.json"))
    args = parser.parse_args()
    rounds, scale = (2, 0.25) if args.quick else (args.rounds, 1.0)
    info = print_machine()
    decision_us = decision_cost(50_000 if args.quick else 200_000)
    isolation_us = isolation_cost(500 if args.quick else 2000)
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-rollout-"))
    run_dir = work / "runs"
    tracking_uri, (v1, v2) = register(run_dir)
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    results: dict[str, list] = {}
    direct, routed = f"/v2/models/{MODEL}/versions/1/infer", f"/v2/models/{MODEL}/infer"
    server = kiln(
        "serve",
        "start",
        v1,
        "serve.deployment.num_cpus=0.5",
        "serve.deployment.threads=1",
        "--port",
        "0",
        "--num-cpus",
        "2",
        "--ingress",
        args.ingress,
        "--run-dir",
        str(run_dir),
        env=env,
    )
    url = server["url"]
    try:
        measure(
            url,
            {"(a) direct /versions/1": (direct, None), "(b) routed, no rollout": (routed, None)},
            rounds,
            scale,
            "none",
            results,
        )
        kiln(
            "rollout",
            "start",
            MODEL,
            "--to",
            "2",
            "--strategy",
            "canary",
            "--weight",
            "50",
            "--bake",
            "1h",
            "--interval",
            "1s",
            "--run-dir",
            str(run_dir),
        )
        wait_rollout_running(run_dir)
        measure(
            url,
            {
                "(a) direct /versions/1": (direct, None),
                "(c) routed, canary 50%": (routed, None),
                "(d) routed, canary 50%, sticky": (routed, {"X-User": "user-42"}),
                "(f) direct /versions/2 (candidate)": (
                    f"/v2/models/{MODEL}/versions/2/infer",
                    None,
                ),
            },
            rounds,
            scale,
            "canary",
            results,
        )
        kiln("rollout", "rollback", MODEL, "--run-dir", str(run_dir))
        kiln(
            "rollout",
            "start",
            MODEL,
            "--to",
            "2",
            "--strategy",
            "shadow",
            "--weight",
            "100",
            "--bake",
            "1h",
            "--interval",
            "1s",
            "--run-dir",
            str(run_dir),
        )
        wait_rollout_running(run_dir)
        measure(
            url,
            {"(a) direct /versions/1": (direct, None), "(e) routed, shadow 100%": (routed, None)},
            rounds,
            scale,
            "shadow",
            results,
        )
    finally:
        subprocess.run(
            [sys.executable, "-m", "kiln.cli", "serve", "stop", "--run-dir", str(run_dir)],
            env=dict(os.environ, PYTHONPATH=str(REPO / "platform")),
            capture_output=True,
            timeout=300,
        )
        shutil.rmtree(work, ignore_errors=True)
    summary = {
        key: {k: statistics.median(r[k] for r in runs) for k in ("throughput", "p50_ms", "p99_ms")}
        | {"errors": sum(r["errors"] for r in runs)}
        for key, runs in results.items()
    }
    print(
        f"\nmedians over {rounds} rounds, ingress {args.ingress}; added = configuration - (a) in "
        "the same phase"
    )
    print(
        "| phase | configuration | c | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | "
        "errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key, s in summary.items():
        phase, label, c = key.split("|")
        base = summary[f"{phase}|(a) direct /versions/1|{c}"]
        print(
            f"| {phase} | {label} | {c} | {s['throughput']:.0f} | {s['p50_ms']:.2f} | "
            f"{s['p99_ms']:.2f} | "
            f"{s['p50_ms'] - base['p50_ms']:+.2f} | {s['p99_ms'] - base['p99_ms']:+.2f} | "
            f"{s['errors']} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": info,
                "ingress": args.ingress,
                "rounds": rounds,
                "decision_us": decision_us,
                "isolation_us": isolation_us,
                "summary": summary,
                "runs": results,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
