"""Serving overhead, side by side in one run: throughput and p50/p99 latency at concurrency 1 and
32.

  (a) the model called in-process (the limit; at "concurrency 32" one call on a batch of 32 rows),
  (b) kiln serve with dynamic batching, (c) kiln serve without batching, in both ingress modes:
      'haproxy' (the default: HAProxy on loopback, straight to the replica) and 'proxy' (Ray
      Serve's Python proxy, kept as an option), one phase each (one Kiln instance at a time, with
      (a) and (d) measured again in each phase),
  (d) a plain FastAPI + uvicorn app serving the same model (bench/fastapi_baseline.py),
  (e) kiln serve over gRPC (the KServe v2 service, tritonclient.grpc.aio, the tensor sent raw), the
      deployment of (b): REST vs gRPC side by side; (f) the same with a minimal gRPC client (one
      prebuilt request's bytes on a grpc.aio channel), as light as the HTTP load generator,
  (g) (e) with the synchronous tritonclient.grpc client (the README's example: one blocking call
      after another), concurrency 1 only, and (h) (b) with a blocking HTTP client as lean as the
      load generator (one keep-alive socket, prebuilt bytes), concurrency 1 only: REST and gRPC
      compared with clients of the same (blocking) style.

Models: the small digits CNN (8x8 inputs) and ResNet-18 on 64x64 RGB inputs (batch-1 compute
dominates). Weights are random: latency does not depend on them. Every request is the same OIP JSON
body. The configurations are measured in interleaved rounds (medians reported) because the machine
is shared. The load generator (bench/loadgen.py) runs in this process, on loopback only, bounded in
requests and time.

    PYTHONPATH=platform python bench/serve_latency.py [--rounds 3] [--quick] [--ingress haproxy]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "platform"))

from loadgen import (  # noqa: E402
    LoadResult,
    percentile,
    run_grpc_blocking_load,
    run_grpc_load,
    run_grpc_raw_load,
    run_load,
    run_load_blocking,
)

GRPC = "grpc"  # a configuration measured over gRPC: (GRPC, host:port, model name)
GRPC_RAW = "grpc-raw"  # the same with the minimal client (prebuilt request bytes)
GRPC_BLOCKING = "grpc-blocking"  # the same with the synchronous tritonclient.grpc (c=1 only)
HTTP_BLOCKING = "http-blocking"  # (url, path) over HTTP with a blocking client (c=1 only)
BLOCKING = (GRPC_BLOCKING, HTTP_BLOCKING)  # one caller: measured at concurrency 1 only

# name -> (architecture, input shape [C, H, W], builder kwargs, intra-op threads). ResNet-18 keeps
# torchvision's ImageNet stem (stride-2 conv + max pool) at 64x64: batch-1 compute (~40 ms)
# dominates the HTTP path. One thread everywhere: on this shared 2-core machine, two OpenMP threads
# ran ResNet-18 ~10x slower than one (each barrier waits for both threads to get a core), which
# would measure the neighbours, not serving.
MODELS = {
    "digits-cnn": ("cnn", [1, 8, 8], {"width": 32, "dropout": 0.1}, 1),
    "resnet18-64": ("resnet18", [3, 64, 64], {"small_input": False}, 1),
}
BOUNDS = {  # (concurrency, max requests, max seconds)
    "digits-cnn": [(1, 500, 6.0), (32, 4000, 8.0)],
    "resnet18-64": [(1, 150, 8.0), (32, 800, 12.0)],
}


def machine() -> dict:
    info = {
        "cpu": "unknown",
        "flags": [],
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in text.splitlines()
            if line.startswith("model name")
        )
        flags = next(
            line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")
        )
        info["flags"] = [f for f in flags if f.startswith(("avx", "amx", "sse4", "fma"))]
    except (OSError, StopIteration):
        pass
    info["load_average"] = list(os.getloadavg())
    return info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register_models(run_dir: Path) -> tuple[str, dict[str, str], dict[str, Path]]:
    """Random-weight artifacts registered as version 1 of each model. Returns (tracking uri, uris,
    dirs)."""
    import torch

    from kiln import tracking as trk
    from kiln.data.preprocess import Preprocessing
    from kiln.models.artifact import build_model, save_artifact
    from kiln.models.spec import ModelSpec

    uri = trk.default_tracking_uri(run_dir)
    exp = trk.ensure_experiment(uri, "bench-serve", run_dir)
    uris, dirs = {}, {}
    for name, (arch, shape, kwargs, _) in MODELS.items():
        channels = shape[0]
        prep = Preprocessing(
            kind="image",
            mean=[0.5] * channels,
            std=[0.25] * channels,
            channels=channels,
            image_size=shape[1:],
        )
        spec = ModelSpec(arch, kwargs, shape, labels=list(range(10)), preprocessing=prep)
        torch.manual_seed(0)
        directory = save_artifact(build_model(spec).eval(), spec, run_dir / "artifacts-src" / name)
        run_id = trk.start_run(uri, exp, f"bench-{name}", {trk.TAG_JOB: "bench"})
        trk.log_artifacts(uri, run_id, directory, trk.MODEL_ARTIFACT_PATH)
        trk.end_run(uri, run_id)
        uris[name] = f"models:/{name}/{trk.register_model(uri, name, run_id)}"
        dirs[name] = directory
    return uri, uris, dirs


def input_for(shape: list[int], seed: int = 0) -> np.ndarray:
    """One request's raw UINT8 image (the same for REST and gRPC)."""
    return np.random.default_rng(seed).integers(0, 256, size=[1, *shape], dtype=np.uint8)


def body_for(shape: list[int], seed: int = 0) -> bytes:
    x = input_for(shape, seed)
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "UINT8",
                    "shape": list(x.shape),
                    "data": x.ravel().tolist(),
                }
            ]
        }
    ).encode()


def serve_config(path: Path, uris: dict[str, str]) -> Path:
    """Each model twice: with batching and without (per-model overrides), so both run in one app
    set."""
    import yaml

    models = []
    for name, uri in uris.items():
        threads = MODELS[name][3]
        for batching, suffix in ((True, "batch"), (False, "nobatch")):
            models.append(
                {
                    "uri": uri,
                    "name": f"{name}-{suffix}",
                    "deployment": {"threads": threads},
                    "batching": {"enabled": batching, "max_batch_size": 32, "wait_ms": 0.0},
                }
            )
    path.write_text(
        yaml.safe_dump(
            {
                "serve": {
                    "deployment": {"num_cpus": 0.25, "max_ongoing_requests": 64},
                    "models": models,
                }
            }
        )
    )
    return path


def start_kiln(config: Path, run_dir: Path, tracking_uri: str, ingress: str) -> dict:
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PYTHONPATH=str(REPO / "platform"))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kiln.cli",
            "serve",
            "start",
            str(config),
            "--port",
            "0",
            "--ingress",
            ingress,
            "--num-cpus",
            "2",
            "--run-dir",
            str(run_dir),
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise SystemExit(f"kiln serve start ({ingress}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stop_kiln(run_dir: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "platform"))
    subprocess.run(
        [sys.executable, "-m", "kiln.cli", "serve", "stop", "--run-dir", str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def start_fastapi(dirs: dict[str, Path]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(HERE), str(REPO / "platform")]),
        KILN_BENCH_MODELS=",".join(f"{n}={d}" for n, d in dirs.items()),
        KILN_BENCH_THREADS=",".join(f"{n}={MODELS[n][3]}" for n in dirs),
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "fastapi_baseline:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=env,
        cwd=HERE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(
                    f"the FastAPI baseline did not start:\n{proc.stderr.read().decode()[-2000:]}"
                ) from None
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the FastAPI baseline did not start within 180 s")


def in_process(
    directory: Path,
    shape: list[int],
    threads: int,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
) -> LoadResult:
    """The model called directly: one row per call at concurrency 1, one 32-row batch per call at
    32."""
    import torch

    from kiln.models.predictor import load_predictor

    torch.set_num_threads(threads)
    predictor = load_predictor(directory)
    rows = 1 if concurrency == 1 else concurrency
    x = np.random.default_rng(0).integers(0, 256, size=[rows, *shape], dtype=np.uint8)
    for _ in range(3):
        predictor.predict_proba(x)
    latencies, started = [], time.perf_counter()
    calls = max(1, max_requests // rows)
    while len(latencies) < calls and time.perf_counter() - started < max_seconds:
        t = time.perf_counter()
        predictor.predict_proba(x)
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return LoadResult(
        concurrency=concurrency,
        requests=len(latencies) * rows,
        errors=0,
        seconds=round(elapsed, 3),
        throughput=len(latencies) * rows / elapsed,
        p50_ms=percentile(latencies, 0.5) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round, a quarter of the requests")
    parser.add_argument(
        "--ingress",
        default="haproxy,proxy",
        help="the ingress modes to measure, one phase each (default: haproxy,proxy)",
    )
    parser.add_argument(
        "--out",
        default=str(HERE / "out" / "serve_latency.json"),
        help="the JSON file to write (a folder: serve_latency.json in it)",
    )
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    scale = 0.25 if args.quick else 1.0
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, flags {' '.join(info['flags'])}")
    print(
        f"load average at start: {' '.join(f'{v:.1f}' for v in info['load_average'])} (a shared "
        "machine)"
    )

    work = Path(tempfile.mkdtemp(prefix="kiln-bench-serve-"))
    tracking_uri, uris, dirs = register_models(work / "runs")
    config = serve_config(work / "serve.yaml", uris)
    fastapi, fastapi_url = start_fastapi(dirs)
    results: dict[str, list] = {}
    try:
        # One Kiln instance at a time: an idle Ray instance still takes CPU on a 2-core machine, so
        # each phase measures one ingress mode beside (a) and (d), in interleaved rounds.
        for ingress in args.ingress.split(","):
            run_dir = work / f"run-{ingress}"
            server = start_kiln(config, run_dir, tracking_uri, ingress)
            print(f"phase {ingress}: kiln serve at {server['url']}", flush=True)
            try:
                configs = {  # label -> (url, path) or None for in-process
                    "(a) in-process": None,
                    "(d) FastAPI + uvicorn": (fastapi_url, "/{model}/infer"),
                    f"(b) kiln serve, batching, {ingress}": (
                        server["url"],
                        "/v2/models/{model}-batch/infer",
                    ),
                    f"(c) kiln serve, no batching, {ingress}": (
                        server["url"],
                        "/v2/models/{model}-nobatch/infer",
                    ),
                    # the same deployment as (b), over gRPC (KServe v2, tritonclient.grpc.aio)
                    f"(e) kiln serve gRPC, batching, {ingress}": (
                        GRPC,
                        server["grpc_url"],
                        "{model}-batch",
                    ),
                    # (e) with a client as light as the HTTP load generator's (prebuilt bytes)
                    f"(f) kiln serve gRPC raw client, {ingress}": (
                        GRPC_RAW,
                        server["grpc_url"],
                        "{model}-batch",
                    ),
                    # (e) with the synchronous tritonclient.grpc (the README's client), c=1
                    f"(g) kiln serve gRPC tritonclient sync, {ingress}": (
                        GRPC_BLOCKING,
                        server["grpc_url"],
                        "{model}-batch",
                    ),
                    # (b) with a blocking HTTP client: REST's counterpart of (g), c=1
                    f"(h) kiln serve REST blocking client, {ingress}": (
                        HTTP_BLOCKING,
                        server["url"],
                        "/v2/models/{model}-batch/infer",
                    ),
                }
                measure(configs, dirs, rounds, scale, ingress, results)
            finally:
                stop_kiln(run_dir)
    finally:
        fastapi.terminate()
        fastapi.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    info["load_average_end"] = list(os.getloadavg())
    summary = summarize(results)
    report(summary, info)
    out = Path(args.out)
    if out.is_dir():  # (a folder given as --out once failed a finished run at this write)
        out = out / "serve_latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"machine": info, "rounds": rounds, "summary": summary, "runs": results}, indent=2
        )
    )
    print(f"\nwrote {out}")
    return 0


def measure(
    configs: dict,
    dirs: dict[str, Path],
    rounds: int,
    scale: float,
    phase: str,
    results: dict[str, list],
) -> None:
    """Every configuration, every concurrency, ``rounds`` times interleaved; results keyed
    model|label|phase|c."""
    for model, (_, shape, _, threads) in MODELS.items():
        body, x = body_for(shape), input_for(shape)

        def load(
            target, concurrency: int, n: int, seconds: float, model=model, body=body, x=x
        ) -> LoadResult:
            if target[0] == GRPC_BLOCKING:
                return run_grpc_blocking_load(
                    target[1], target[2].format(model=model), x, n, seconds
                )
            if target[0] == HTTP_BLOCKING:
                return run_load_blocking(target[1], target[2].format(model=model), body, n, seconds)
            if target[0] in (GRPC, GRPC_RAW):
                run = run_grpc_load if target[0] == GRPC else run_grpc_raw_load
                return run(target[1], target[2].format(model=model), x, concurrency, n, seconds)
            return run_load(target[0], target[1].format(model=model), body, concurrency, n, seconds)

        for target in configs.values():  # warm up every path (first requests load and compile)
            if target:
                load(target, 1 if target[0] in BLOCKING else 4, 40, 30.0)
        for r in range(rounds):
            for label, target in configs.items():
                for concurrency, max_requests, max_seconds in BOUNDS[model]:
                    if concurrency != 1 and target is not None and target[0] in BLOCKING:
                        continue  # one blocking caller: concurrency 1 only
                    n = max(concurrency, int(max_requests * scale))
                    if target is None:
                        res = in_process(
                            dirs[model], shape, threads, concurrency, n, max_seconds * scale + 1
                        )
                    else:
                        res = load(target, concurrency, n, max_seconds * scale + 1)
                    results.setdefault(f"{model}|{label}|{phase}|{concurrency}", []).append(
                        res.to_dict()
                    )
                    print(
                        f"  {phase:<8} round {r + 1} {model:<12} {label:<38} c={concurrency:<3} "
                        f"{res.throughput:8.1f} req/s  p50 {res.p50_ms:7.2f} ms  p99 "
                        f"{res.p99_ms:8.2f} ms  "
                        f"errors {res.errors}",
                        flush=True,
                    )


def summarize(results: dict[str, list]) -> dict[str, dict]:
    summary = {}
    for key, runs in results.items():
        summary[key] = {
            k: statistics.median(r[k] for r in runs) for k in ("throughput", "p50_ms", "p99_ms")
        }
        summary[key]["errors"] = sum(r["errors"] for r in runs)
    return summary


def report(summary: dict[str, dict], info: dict) -> None:
    print(
        f"\nmedians; load average at end: {' '.join(f'{v:.1f}' for v in info['load_average_end'])}"
    )
    print(
        "| model | phase | configuration | c | req/s | p50 ms | p99 ms "
        "|\n|---|---|---|---|---|---|---|"
    )
    for key, s in summary.items():
        model, label, phase, c = key.split("|")
        print(
            f"| {model} | {phase} | {label} | {c} | {s['throughput']:.0f} | {s['p50_ms']:.2f} | "
            f"{s['p99_ms']:.1f} |"
        )
    print("\ntargets (the default ingress, haproxy; the proxy option beside it):")
    for phase in dict.fromkeys(key.split("|")[2] for key in summary):  # the phases measured

        def get(model, label, c, field, phase=phase):
            return summary.get(f"{model}|{label}|{phase}|{c}", {}).get(field, float("nan"))

        b, cc, d = (
            f"(b) kiln serve, batching, {phase}",
            f"(c) kiln serve, no batching, {phase}",
            "(d) FastAPI + uvicorn",
        )
        m = "digits-cnn"
        print(
            f"  [{phase}] digits: (b)/(d) throughput at c=32 = "
            f"{get(m, b, 32, 'throughput') / get(m, d, 32, 'throughput'):.2f} (target >= 1.0); "
            f"p50 at c=1: (b) - (d) = {get(m, b, 1, 'p50_ms') - get(m, d, 1, 'p50_ms'):+.2f} ms "
            "(target <= 1)"
        )
        e = f"(e) kiln serve gRPC, batching, {phase}"
        f = f"(f) kiln serve gRPC raw client, {phase}"
        g = f"(g) kiln serve gRPC tritonclient sync, {phase}"
        h = f"(h) kiln serve REST blocking client, {phase}"
        for m in MODELS:
            print(
                f"  [{phase}] {m}: gRPC raw client vs REST (f)/(b): p50 at c=1 "
                f"{get(m, f, 1, 'p50_ms'):.2f} vs {get(m, b, 1, 'p50_ms'):.2f} ms, throughput at "
                f"c=32 {get(m, f, 32, 'throughput') / get(m, b, 32, 'throughput'):.2f}x"
            )
            print(
                f"  [{phase}] {m}: gRPC vs REST (e)/(b): p50 at c=1 "
                f"{get(m, e, 1, 'p50_ms'):.2f} vs {get(m, b, 1, 'p50_ms'):.2f} ms (target: no "
                f"worse), p99 {get(m, e, 1, 'p99_ms'):.1f} vs {get(m, b, 1, 'p99_ms'):.1f} ms; "
                "throughput at c=32 "
                f"{get(m, e, 32, 'throughput') / get(m, b, 32, 'throughput'):.2f}x"
            )
            print(
                f"  [{phase}] {m}: blocking clients at c=1, gRPC tritonclient sync (g) vs REST "
                f"(h): p50 {get(m, g, 1, 'p50_ms'):.2f} vs {get(m, h, 1, 'p50_ms'):.2f} ms; (g) "
                f"vs REST's load generator (b): {get(m, g, 1, 'p50_ms'):.2f} vs "
                f"{get(m, b, 1, 'p50_ms'):.2f} ms"
            )
        m = "resnet18-64"
        print(
            f"  [{phase}] resnet18: (b)/(c) throughput at c=32 = "
            f"{get(m, b, 32, 'throughput') / get(m, cc, 32, 'throughput'):.2f} (target >= 2); "
            f"(b)/(d) = {get(m, b, 32, 'throughput') / get(m, d, 32, 'throughput'):.2f}"
        )


if __name__ == "__main__":
    sys.exit(main())
