"""The one evaluation harness: every variant (and its fp32 reference) measured the same way.

Each artifact is loaded with ``load_predictor`` (the runtime users and serving get) and measured
on the test split: accuracy, macro-F1, parameters, serialized size (every file of the artifact),
batch-1 latency p50/p99 and batch throughput. Timings are taken side by side: every round runs
every model in turn, and medians over rounds are reported, because the machine may be shared.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kiln.compress.config import BenchmarkConfig
from kiln.data.dataset import PreparedData
from kiln.models.artifact import artifact_size, build_model, load_spec
from kiln.models.builders import count_parameters
from kiln.models.predictor import Predictor, load_predictor
from kiln.train.metrics import accuracy, f1_macro

WARMUP_CALLS = 3


@dataclass
class Metrics:
    """What the harness reports for one model (the ``metrics`` of the --json output)."""

    test_accuracy: float
    test_f1_macro: float
    params: int
    size_bytes: int
    latency_p50_ms: float
    latency_p99_ms: float
    throughput: float  # samples per second at the benchmark batch size

    def to_dict(self) -> dict:
        return asdict(self)


def parameter_count(directory: Path) -> int:
    """Parameters of the artifact's network: counted on the rebuilt torch model, or, for formats
    that store no torch model (ONNX), the count recorded when the variant was made."""
    spec = load_spec(directory)
    if spec.format == "safetensors":
        return count_parameters(build_model(spec))
    return int(spec.variant.get("param_count", 0))


def quality(predictor: Predictor, data: PreparedData) -> tuple[float, float]:
    """(test accuracy, test macro-F1) on the whole test split (streamed when it is larger than the
    driver's sample)."""
    from kiln.train.run import test_confusion

    cm = test_confusion(predictor, data)
    return accuracy(cm), f1_macro(cm)


def _batch(x: np.ndarray, size: int) -> np.ndarray:
    """``size`` rows of ``x`` (repeated when the split is smaller)."""
    reps = -(-size // max(len(x), 1))
    return (
        np.ascontiguousarray(np.concatenate([x] * reps)[:size])
        if reps > 1
        else np.ascontiguousarray(x[:size])
    )


def measure_speed(
    predictors: dict[str, Predictor], x: np.ndarray, bench: BenchmarkConfig
) -> dict[str, dict[str, float]]:
    """Latency p50/p99 (ms, batch 1) and throughput (samples/s, batch ``bench.throughput_batch``)
    per model, interleaved: each round measures every model in turn."""
    batch = _batch(x, bench.throughput_batch)
    singles = [
        np.ascontiguousarray(x[i : i + 1]) for i in range(min(len(x), bench.latency_runs))
    ] or [batch[:1]]
    latencies: dict[str, list[float]] = {n: [] for n in predictors}
    rates: dict[str, list[float]] = {n: [] for n in predictors}
    for p in predictors.values():
        for _ in range(WARMUP_CALLS):
            p.runtime(batch)
            p.runtime(singles[0])
    for _ in range(bench.rounds):
        for name, p in predictors.items():
            run = p.runtime
            # Untimed calls first: thread pools that went idle while the previous model ran must
            # wake up (torch's OpenMP workers are otherwise slow to resume after ONNX Runtime ran).
            for _ in range(WARMUP_CALLS):
                run(singles[0])
            for i in range(bench.latency_runs):
                xi = singles[i % len(singles)]
                t0 = time.perf_counter()
                run(xi)
                latencies[name].append((time.perf_counter() - t0) * 1000.0)
            times = []
            for _ in range(bench.throughput_runs):
                t0 = time.perf_counter()
                run(batch)
                times.append(time.perf_counter() - t0)
            rates[name].append(len(batch) / float(np.median(times)))
    return {
        n: {
            "latency_p50_ms": float(np.percentile(latencies[n], 50)),
            "latency_p99_ms": float(np.percentile(latencies[n], 99)),
            "throughput": float(np.median(rates[n])),
        }
        for n in predictors
    }


def evaluate_artifacts(
    artifacts: dict[str, Path], data: PreparedData, bench: BenchmarkConfig
) -> dict[str, Metrics]:
    """Metrics for every artifact folder by name, speed measured side by side."""
    predictors = {name: load_predictor(path) for name, path in artifacts.items()}
    speed = measure_speed(predictors, data.x_test, bench)
    out = {}
    for name, path in artifacts.items():
        acc, f1 = quality(predictors[name], data)
        out[name] = Metrics(
            test_accuracy=acc,
            test_f1_macro=f1,
            params=parameter_count(path),
            size_bytes=artifact_size(path),
            **speed[name],
        )
    return out
