"""What live monitoring costs per request, and how fast it detects a shift.

1. Added latency: the replica's request path of ModelServer (parse the OIP JSON body, prepare the
   tensor, run the model, encode the response) with monitoring off and on (observe: OOD score,
   window append, metrics counters, evaluations on the monitor thread every ``eval_every`` rows, the
   flags in the response), interleaved request by request in one process, several rounds, batch-1
   requests (the worst case: the per-request cost is not shared by rows). HTTP and Serve's proxy
   add the same milliseconds either way and are left out so that the difference is measurable.
2. A reader during traffic: what a read of the latest signals (a rollout gate, the status endpoint)
   holds the replica's event loop for, by window size.
3. Detection delay: requests (batch 1) from the start of a fixed shift until the alert fires, after
   a full window of in-distribution traffic, with the default monitor config and a smaller window.

Model: the digits CNN trained in-process (3 epochs) and an MLP on a synthetic tabular set.

    PYTHONPATH=platform python bench/monitor_overhead.py [--rounds 5] [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "tests"))

from machine import print_machine  # noqa: E402

SPLIT = {"val": 0.3, "test": 0.3, "seed": 0}


def train(data: dict, model: dict, epochs: int, work: Path):
    from kiln.data.dataset import prepare_data
    from kiln.models.predictor import load_predictor
    from kiln.monitor.reference import load_reference, write_reference
    from kiln.schema import validate_config
    from kiln.train.loop import train_epochs
    from kiln.train.session import LocalSession

    cfg = validate_config(
        {
            "experiment": {"name": "bench", "run_dir": str(work)},
            "data": data,
            "model": model,
            "train": {
                "epochs": epochs,
                "batch_size": 64,
                "lr": 0.003,
                "seed": 0,
                "cpus_per_worker": 1,
            },
        }
    )
    prepared = prepare_data(cfg.data)
    session = LocalSession(str(work / f"ckpt-{model['name']}"))
    train_epochs(cfg, prepared, session)
    model_dir = work / f"model-{model['name']}"
    shutil.copytree(session.latest_checkpoint(), model_dir)
    write_reference(model_dir, prepared)
    return load_predictor(model_dir), prepared, load_reference(model_dir), model_dir


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


async def request_path(served, body: bytes, monitors) -> bytes:
    """What ModelServer._infer does for one request, minus HTTP (monitors=None: monitoring off)."""
    from kiln.monitor.reference.features import softmax
    from kiln.serve.protocol import encode_infer_response, parse_infer_request, select_outputs

    req = parse_infer_request(body, None)
    x = served.prepare_tensors(req.inputs)
    logits = served.predictor.logits(x, batch_size=len(x))
    probs = softmax(logits)
    ood = monitors.observe(served.version, x, logits, probs) if monitors is not None else None
    content, _ = encode_infer_response(
        "digits",
        served.version,
        req.id,
        select_outputs(req, served.output_tensors(probs)),
        ood.parameters() if ood is not None else None,
    )
    return content


async def overhead(predictor, model_dir: Path, raw: np.ndarray, rounds: int, requests: int) -> dict:
    from kiln.monitor.live.config import MonitorConfig
    from kiln.monitor.live.metrics import MonitorMetrics
    from kiln.monitor.live.served import ReplicaMonitors
    from kiln.serve.versions import ServedVersion

    served = ServedVersion("digits", "1", predictor)
    monitors = ReplicaMonitors("digits", MonitorConfig(), MonitorMetrics())
    monitors.add("1", model_dir)
    bodies = [
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "UINT8",
                        "shape": [1, *img.shape],
                        "data": img.ravel().tolist(),
                    }
                ]
            }
        ).encode()
        for img in raw
    ]
    for body in bodies[:100]:  # warm-up both paths
        await request_path(served, body, None)
        await request_path(served, body, monitors)
    off_all, on_all, diff_p50 = [], [], []
    for r in range(rounds):
        off, on = [], []
        for i in range(requests):
            body = bodies[(r * requests + i) % len(bodies)]
            first, second = (
                (None, monitors) if i % 2 == 0 else (monitors, None)
            )  # alternate the order
            for m in (first, second):
                t = time.perf_counter()
                await request_path(served, body, m)
                (on if m is not None else off).append((time.perf_counter() - t) * 1000)
            await asyncio.sleep(
                0
            )  # let the monitor thread's evaluation callbacks run, as in a replica
        off_all += off
        on_all += on
        diff_p50.append(pct(on, 50) - pct(off, 50))
        print(
            f"  round {r + 1}: off p50 {pct(off, 50):.3f} ms p99 {pct(off, 99):.3f} | on p50 "
            f"{pct(on, 50):.3f} ms "
            f"p99 {pct(on, 99):.3f} | added p50 {diff_p50[-1] * 1000:.0f} us",
            flush=True,
        )
    monitor = monitors.monitors["1"]
    evaluations = monitor.last
    snapshot = monitor.take_snapshot()
    times = []
    for _ in range(50):  # the CPU one evaluation of a full window takes (on the monitor thread)
        t = time.perf_counter()
        monitor.evaluate(snapshot)
        times.append((time.perf_counter() - t) * 1000)
    return {
        "evaluation_ms": statistics.median(times),
        "eval_every": monitor.cfg.eval_every,
        "off_p50": pct(off_all, 50),
        "off_p99": pct(off_all, 99),
        "on_p50": pct(on_all, 50),
        "on_p99": pct(on_all, 99),
        "added_p50_median_of_rounds": statistics.median(diff_p50),
        "added_p99": pct(on_all, 99) - pct(off_all, 99),
        "evaluated_rows": evaluations.rows if evaluations else 0,
    }


async def reader_stall(predictor, model_dir: Path, x: np.ndarray, window: int, reads: int) -> dict:
    """A reader (a rollout gate every 0.5 s, the status endpoint) while traffic flows: what one read
    holds the replica's event loop for. It takes the window's snapshot on the loop and awaits the
    evaluation on the monitor thread; ``evaluation_ms`` is what the loop paid per read when the
    read evaluated there (before 2026-11-29). ``max_gap_ms``: the longest the loop went without
    running a 1 ms ticker during the reads."""
    from kiln.monitor.live.config import MonitorConfig
    from kiln.monitor.live.served import ReplicaMonitors
    from kiln.monitor.reference.features import softmax

    monitors = ReplicaMonitors("digits", MonitorConfig(window=window, min_rows=100))
    monitors.add("1", model_dir)
    monitor = monitors.monitors["1"]

    def send(rows: int, start: int) -> None:
        for i in range(start, start + rows, 250):
            batch = x[np.arange(i, min(i + 250, start + rows)) % len(x)]
            logits = predictor.logits(batch, batch_size=len(batch))
            monitors.observe("1", batch, logits, softmax(logits))

    send(window, 0)
    await monitors.signals("1")
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append((now - last) * 1000)
            last = now

    read_gaps, read_ms = [], []
    tick = asyncio.get_running_loop().create_task(ticker())
    for r in range(reads):
        send(10, window + r * 10)  # fewer than eval_every (50): only the read evaluates them
        await asyncio.sleep(0.01)
        gaps.clear()
        t = time.perf_counter()
        await monitors.signals("1")
        read_ms.append((time.perf_counter() - t) * 1000)
        read_gaps.append(max(gaps, default=0.0))
    stop.set()
    await tick
    snap = monitor.take_snapshot()
    evaluation = []
    for _ in range(5):
        t = time.perf_counter()
        monitor.evaluate(snap)
        evaluation.append((time.perf_counter() - t) * 1000)
    return {
        "window": window,
        "evaluation_ms": statistics.median(evaluation),
        "read_ms": statistics.median(read_ms),
        "max_gap_ms": max(read_gaps),
        "median_max_gap_ms": statistics.median(read_gaps),
    }


def detection_delay(
    predictor, reference, baseline: np.ndarray, shifted: np.ndarray, signal: str, **cfg
) -> int | None:
    """Batch-1 requests after the shift starts until ``signal`` fires (None: not within the shifted
    rows)."""
    from kiln.monitor.live.config import MonitorConfig
    from kiln.monitor.live.monitor import VersionMonitor
    from kiln.monitor.reference.features import softmax

    fired: list = []
    config = MonitorConfig(**cfg)
    monitor = VersionMonitor("bench", "1", reference, config, on_alert=fired.append)
    for i in range(config.window):  # a full window of in-distribution traffic first
        row = baseline[i % len(baseline)][None]
        logits = predictor.logits(row)
        monitor.observe(row, logits, softmax(logits))
        if monitor.due():
            monitor.evaluate()
    assert not fired, f"false alert on in-distribution traffic: {fired}"
    for n, row in enumerate(shifted, start=1):
        row = row[None]
        logits = predictor.logits(row)
        monitor.observe(row, logits, softmax(logits))
        if monitor.due() and any(
            a.signal == signal and a.state == "firing" for a in monitor.evaluate().alerts
        ):
            return n
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--requests", type=int, default=1000, help="requests per configuration per round"
    )
    args = parser.parse_args()
    import logging

    from kiln.cli import configure_process

    configure_process()  # Kiln's process set-up: Ray Data's progress logs off, as in a replica

    import ray

    from synthetic import tabular_parquet

    print_machine()
    ray.init(
        address="local",
        num_cpus=1,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-monitor-"))
    try:
        predictor, data, reference, model_dir = train(
            {"source": "digits", "image": "image", "split": SPLIT},
            {"name": "cnn", "width": 8, "dropout": 0.0},
            3,
            work,
        )
        prep = predictor.spec.preprocessing
        raw = (
            np.round(
                (
                    data.x_test * np.asarray(prep.std)[None, :, None, None]
                    + np.asarray(prep.mean)[None, :, None, None]
                )
                * 255
            )
            .clip(0, 255)
            .astype(np.uint8)
        )
        print(
            f"\n## added latency per batch-1 request (replica request path, {args.rounds} rounds x "
            f"{args.requests} requests per configuration, interleaved)"
        )
        result = asyncio.run(overhead(predictor, model_dir, raw, args.rounds, args.requests))
        print(f"monitoring off: p50 {result['off_p50']:.3f} ms, p99 {result['off_p99']:.3f} ms")
        print(f"monitoring on:  p50 {result['on_p50']:.3f} ms, p99 {result['on_p99']:.3f} ms")
        print(
            f"added: p50 {result['added_p50_median_of_rounds'] * 1000:.0f} us (median over "
            "rounds), "
            f"p99 {result['added_p99'] * 1000:.0f} us"
        )
        print(
            f"one drift evaluation of a full window ({result['evaluated_rows']} rows): "
            f"{result['evaluation_ms']:.2f} ms "
            f"on the monitor thread, every {result['eval_every']} rows = "
            f"{result['evaluation_ms'] * 1000 / result['eval_every']:.0f} us of CPU per row, "
            "amortized"
        )

        print(
            "\n## a reader during traffic (a rollout gate reads every 0.5 s): what one read holds "
            "the event loop for"
        )
        print(
            "| window (rows) | evaluation (was on the loop per read) | read, awaited | longest "
            "loop gap during a read (median, max of reads) |"
        )
        print("|---:|---:|---:|---:|")
        for window in (500, 10_000, 100_000):
            stall = asyncio.run(reader_stall(predictor, model_dir, data.x_test, window, 20))
            print(
                f"| {window:,} | {stall['evaluation_ms']:.1f} ms | {stall['read_ms']:.1f} ms | "
                f"{stall['median_max_gap_ms']:.1f} / {stall['max_gap_ms']:.1f} ms |",
                flush=True,
            )

        rng = np.random.default_rng(0)
        order = rng.permutation(len(data.x_test))
        baseline = data.x_test[order]
        inverted = prep.apply(255 - raw[order])
        noise = prep.apply(rng.integers(0, 256, (2000, 1, 8, 8)).astype(np.uint8))
        source = tabular_parquet(work / "animals.parquet", rows=3000, seed=0, nulls=False)
        tab_pred, tab_data, tab_ref, _ = train(
            {"source": str(source), "label": "species", "split": SPLIT},
            {"name": "mlp", "hidden": [16], "dropout": 0.0},
            5,
            work,
        )
        tprep = tab_pred.spec.preprocessing
        names = list(tprep.feature_names)
        traw = tab_data.x_test * np.asarray(tprep.std) + np.asarray(tprep.mean)
        traw[:, names.index("count")] = np.round(traw[:, names.index("count")])
        traw[:, names.index("noise")] += 1.0  # one feature offset by one standard deviation
        traw[:, names.index("big")] *= 1.5  # one feature scaled
        tab_shift = np.tile(tprep.apply(traw.astype(np.float32)), (3, 1))
        tab_base = tab_data.x_test[rng.permutation(len(tab_data.x_test))]
        print(
            "\n## detection delay: batch-1 requests from the start of the shift to the alert "
            "(after a full window of in-distribution traffic)"
        )
        print(
            "| shift | signal | window 500, eval every 50 (defaults) | window 200, eval every 20 |"
        )
        print("|---|---|---|---|")
        cases = [
            (
                "digits inverted",
                predictor,
                reference,
                baseline,
                np.tile(inverted, (3, 1, 1, 1)),
                "drift",
            ),
            ("digits uniform noise", predictor, reference, baseline, noise, "drift"),
            ("digits uniform noise", predictor, reference, baseline, noise, "ood_rate"),
            ("tabular: big x1.5, noise +1 sd", tab_pred, tab_ref, tab_base, tab_shift, "drift"),
        ]
        for name, pred, ref, base, shifted, signal in cases:
            default = detection_delay(pred, ref, base, shifted, signal)
            small = detection_delay(
                pred, ref, base, shifted, signal, window=200, eval_every=20, min_rows=100
            )
            print(f"| {name} | {signal} | {default} | {small} |")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
