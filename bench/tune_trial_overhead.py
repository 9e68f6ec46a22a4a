"""Where the time of a multi-worker trial goes: one ``fit_on_ray`` run (what a ``trial_workers: 2``
trial runs inside its Tune trial), with a timeline of Ray Train's controller, worker group and
reports.

The timeline comes from a Ray Train callback passed in ``RunConfig(callbacks=...)``: Ray Train V2
runs callbacks that are not ``UserCallback``s as its own internal ones, so their hooks (controller
start, worker group start and shutdown, each report, worker context start) fire where Ray Train
does that work. Those hook classes are Ray internals (``ray.train.v2._internal``): fine for a
measurement, not for Kiln's library (checked against Ray 2.60).

Usage: python bench/tune_trial_overhead.py [--runs 2] [--epochs 2] [--workers 2]
Prints the phases of each run (the first one pays for cold worker processes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT / "platform"), os.environ.get("PYTHONPATH")) if p
)


def timeline_callback(path: str):
    """A Ray Train internal callback appending ``{"event", "t", "pid"}`` lines to ``path``."""
    from ray.train.v2._internal.execution.callback import (
        ControllerCallback,
        ReportCallback,
        WorkerCallback,
        WorkerGroupCallback,
    )

    class Timeline(ControllerCallback, WorkerGroupCallback, ReportCallback, WorkerCallback):
        def __init__(self, path: str):
            self.path = path

        def _mark(self, event: str) -> None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"event": event, "t": time.time(), "pid": os.getpid()}) + "\n")

        def after_controller_start(self, train_run_context):
            self._mark("controller_started")

        def before_worker_group_start(self, worker_group_context):
            self._mark("worker_group_starting")

        def after_worker_group_start(self, worker_group):
            self._mark("worker_group_started")

        def after_worker_group_training_start(self, worker_group):
            self._mark("training_started")

        def after_init_train_context(self):
            self._mark("worker_context_ready")

        def after_report(self, training_report, metrics=None):
            self._mark("report")

        def before_worker_group_shutdown(self, worker_group):
            self._mark("worker_group_stopping")

        def after_worker_group_shutdown(self, worker_group_context):
            self._mark("worker_group_stopped")

        def after_controller_finish(self, result):
            self._mark("controller_finished")

    return Timeline(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    # The process set-up of Kiln's entry points (environment defaults read when Ray, the Tuner and
    # TorchTrainer start; Ray Data's progress bars off: Tune's trial stdout cannot draw them).
    from kiln.cli import configure_process

    configure_process()

    from kiln.data.dataset import open_splits, prepare_data
    from kiln.ray_connection import ensure_ray
    from kiln.schema import validate_config
    from kiln.train.run import fit_on_ray
    from machine import machine_info

    print(f"machine: {machine_info()}")
    tmp = Path(tempfile.mkdtemp(prefix="kiln-trial-overhead-"))
    cfg = validate_config(
        {
            "experiment": {"name": "overhead", "run_dir": str(tmp / "runs")},
            "data": {"source": "digits", "image": "image"},
            "model": {"name": "cnn", "width": 16, "dropout": 0.1},
            "train": {
                "epochs": args.epochs,
                "workers": args.workers,
                "cpus_per_worker": 0.5,
                "seed": 0,
            },
        }
    )
    t = time.time()
    ensure_ray(None, num_cpus=2)
    print(f"ray start (once per sweep): {time.time() - t:.1f} s")
    t = time.time()
    data = prepare_data(cfg.data)
    datasets = open_splits(data, ("train", "val"), cfg.train.data.cache)
    print(f"data prepared and splits opened (once per sweep): {time.time() - t:.1f} s")
    for run in range(args.runs):
        path = tmp / f"timeline_{run}.jsonl"
        started = time.time()
        result = fit_on_ray(
            cfg,
            data,
            None,
            f"overhead-{run}",
            callbacks=[timeline_callback(str(path))],
            datasets=datasets,
        )
        ended = time.time()
        events = [json.loads(line) for line in path.read_text().splitlines()]
        firsts: dict[str, float] = {}
        for e in events:
            firsts.setdefault(e["event"], e["t"])
        reports = [e["t"] for e in events if e["event"] == "report"]
        marks = [("fit() called", started)]
        marks += sorted(((k, v) for k, v in firsts.items() if k != "report"), key=lambda kv: kv[1])
        marks += [(f"report {i + 1}", r) for i, r in enumerate(reports)]
        marks.append(("fit() returned", ended))
        marks.sort(key=lambda kv: kv[1])
        print(f"\nrun {run + 1}: {ended - started:.1f} s in all (error: {result.error})")
        prev = started
        for name, when in marks:
            print(f"  +{when - started:6.1f} s  ({when - prev:5.1f} s since previous)  {name}")
            prev = when
        if result.metrics:
            rows = data.sizes()["train"]
            print(
                f"  last epoch's training time from its throughput: "
                f"{rows / result.metrics['samples_per_s']:.1f} s; val_accuracy "
                f"{result.metrics['val_accuracy']:.6f}, val_loss {result.metrics['val_loss']:.6f}"
            )
    # The same config and seed on one worker: how far a best.yaml trained on another worker count
    # lands from the trial's metric.
    one = cfg.model_copy(update={"train": cfg.train.model_copy(update={"workers": 1})})
    result = fit_on_ray(one, data, None, "overhead-one-worker", datasets=datasets)
    if result.metrics:
        print(
            f"\none worker, same config and seed: val_accuracy "
            f"{result.metrics['val_accuracy']:.6f}, val_loss {result.metrics['val_loss']:.6f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
