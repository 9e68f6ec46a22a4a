"""Tuning benchmark: sample efficiency of TPE + ASHA against random search, and per-trial overhead.

Sample efficiency: the same search space, trial budget (num_samples x max_epochs) and concurrency,
searched by (a) Optuna TPE with ASHA early stopping and (b) random sampling with every trial
trained to the end. For each, the training epochs spent (all trials, in the order their epochs
were reported) until the validation accuracy first reaches the target. Median over seeds.

Overhead: one trial at a time, the sweep's wall time minus the time spent in epochs (training,
validation, checkpoint), per trial: for in-process trials (kiln's default for one worker) and
for trials that each start a 2-worker Ray Train run.

Usage: python bench/tune_efficiency.py [--seeds 5] [--trials 16] [--epochs 6] [--target 0.99]
Prints a report and writes bench/out/tune_efficiency.json. About 10 minutes on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
# Ray's worker processes import kiln too: from this checkout, like this process.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT / "platform"), os.environ.get("PYTHONPATH")) if p
)

# A wide space, as a first sweep over an unfamiliar model would use: much of it trains badly in
# 6 epochs (learning rates far off, tiny widths, heavy weight decay or dropout).
SPACE = {
    "train.lr": {"loguniform": [1.0e-6, 1.0]},
    "train.optimizer": {"choice": ["adamw", "sgd"]},
    "train.batch_size": {"choice": [16, 32, 64, 128, 256]},
    "train.weight_decay": {"loguniform": [1.0e-6, 3.0e-1]},
    "model.width": {"int": [2, 32]},
    "model.dropout": {"uniform": [0.0, 0.8]},
}


def machine() -> dict:
    """CPU model and flags (from /proc/cpuinfo), core count, load average."""
    info = {
        "cpu_model": platform.processor() or "unknown",
        "cpu_flags": "",
        "cores": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and info["cpu_model"] in ("unknown", "x86_64", ""):
                info["cpu_model"] = value.strip()
            if key.strip() == "flags" and not info["cpu_flags"]:
                info["cpu_flags"] = value.strip()
    except OSError:
        pass
    info["loadavg_start"] = os.getloadavg()
    return info


def sweep_config(
    run_dir: Path,
    name: str,
    seed: int,
    searcher: str,
    asha: bool,
    trials: int,
    epochs: int,
    concurrency: int,
    trial_workers: int = 1,
    space: dict | None = None,
):
    from kiln.config import read_yaml
    from kiln.schema import validate_config

    data = read_yaml(ROOT / "configs/train/digits_cnn.yaml")
    data["experiment"] = {"name": name, "run_dir": str(run_dir)}
    data["model"] = {"name": "cnn", "width": 16, "dropout": 0.1}
    data["train"].update(epochs=epochs, seed=0)
    data["tune"] = {
        "name": f"{name}-s{seed}",
        "space": space or SPACE,
        "searcher": searcher,
        "seed": seed,
        "startup_trials": 4,
        "num_samples": trials,
        "max_epochs": epochs,
        "max_concurrent_trials": concurrency,
        "cpus_per_worker": 0.5,
        "trial_workers": trial_workers,
        "asha": {"grace_period": 1, "reduction_factor": 3} if asha else None,
    }
    return validate_config(data)


def epochs_to_target(result, target: float) -> tuple[int, bool]:
    """Epochs spent over all trials, in report order, until one reaches ``target`` (or all of
    them)."""
    rows = sorted(
        (h["reported_at"], h.get("val_accuracy", 0.0)) for t in result.trials for h in t.history
    )
    for i, (_, acc) in enumerate(rows, start=1):
        if acc >= target:
            return i, True
    return len(rows), False


def run_efficiency(args, run_dir: Path) -> dict:
    from kiln.tune.sweep import run_sweep

    methods = {"tpe_asha": ("tpe", True), "random_full": ("random", False)}
    rows = []
    for seed in range(args.seeds):
        for method, (searcher, asha) in methods.items():
            cfg = sweep_config(
                run_dir,
                f"bench-{method}",
                seed,
                searcher,
                asha,
                args.trials,
                args.epochs,
                args.concurrency,
            )
            started = time.monotonic()
            result = run_sweep(cfg)
            wall = time.monotonic() - started
            spent, reached = epochs_to_target(result, args.target)
            total = sum(t.epochs for t in result.trials)
            best = max((t.metrics.get("val_accuracy", 0.0) for t in result.trials), default=0.0)
            rows.append(
                {
                    "seed": seed,
                    "method": method,
                    "epochs_to_target": spent,
                    "reached": reached,
                    "epochs_total": total,
                    "best_val_accuracy": best,
                    "stopped_early": result.stopped_early,
                    "wall_s": wall,
                }
            )
            shown = f"{spent:>3}" if reached else f"not reached in {spent}"
            print(
                f"  seed {seed}  {method:<11}  epochs to {args.target}: {shown}"
                f"  total epochs {total:>3}  best {best:.4f}  stopped early "
                f"{result.stopped_early:>2}  "
                f"{wall:5.0f} s",
                flush=True,
            )
    summary = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        # A run that never reached the target counts as infinitely many epochs (it is censored).
        to_target = [r["epochs_to_target"] if r["reached"] else math.inf for r in mine]
        summary[method] = {
            "median_epochs_to_target": statistics.median(to_target),
            "reached": sum(r["reached"] for r in mine),
            "runs": len(mine),
            "median_total_epochs": statistics.median(r["epochs_total"] for r in mine),
            "median_wall_s": statistics.median(r["wall_s"] for r in mine),
        }
    a, b = (
        summary["tpe_asha"]["median_epochs_to_target"],
        summary["random_full"]["median_epochs_to_target"],
    )
    # When random search's median run never reached the target, its median is at least its whole
    # budget: the ratio against the budget is an upper bound.
    budget = args.trials * args.epochs
    summary["ratio_tpe_asha_over_random"] = a / b if math.isfinite(b) else a / budget
    summary["ratio_is_upper_bound"] = not math.isfinite(b)
    return {"rows": rows, "summary": summary}


def run_overhead(args, run_dir: Path) -> dict:
    """Seconds per trial outside epochs, one trial at a time, in-process vs Ray Train trials."""
    from kiln.data.dataset import prepare_data
    from kiln.tune.sweep import run_sweep

    space = {"train.lr": {"loguniform": [1.0e-3, 1.0e-2]}}
    out = {}
    for kind, workers, trials in (
        ("in_process", 1, args.overhead_trials),
        ("ray_train_2_workers", 2, 2),
    ):
        cfg = sweep_config(
            run_dir,
            f"bench-overhead-{kind}",
            0,
            "random",
            False,
            trials,
            2,
            1,
            trial_workers=workers,
            space=space,
        )
        started = time.monotonic()
        result = run_sweep(cfg)
        wall = time.monotonic() - started
        # In-process trials time each epoch (train, validate, checkpoint); a Ray Train run reports
        # its training throughput only, so there the time in epochs is training time (a lower
        # bound).
        rows = len(prepare_data(cfg.data).y_train)
        in_epochs = sum(
            h["epoch_seconds"] if "epoch_seconds" in h else rows / h["samples_per_s"]
            for t in result.trials
            for h in t.history
        )
        out[kind] = {
            "trials": trials,
            "wall_s": wall,
            "epoch_s": in_epochs,
            "overhead_s_per_trial": (wall - in_epochs) / trials,
        }
        print(
            f"  {kind:<20} {trials} trials  wall {wall:6.1f} s  in epochs {in_epochs:6.1f} s  "
            f"outside training {out[kind]['overhead_s_per_trial']:5.1f} s/trial",
            flush=True,
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--concurrency", type=int, default=2)
    # What the CLI entry sets (read when the Tuner / TorchTrainer starts).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    parser.add_argument("--overhead-trials", type=int, default=6)
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args()

    from kiln.ray_connection import ensure_ray

    out_dir = ROOT / "bench" / "out"
    run_dir = out_dir / "tune_runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(
        f"machine: {info['cpu_model']}, {info['cores']} cores, load average "
        f"{info['loadavg_start'][0]:.1f} at start"
    )
    print(f"flags:   {info['cpu_flags']}")
    ensure_ray(None, num_cpus=2)
    print(
        f"\nsample efficiency: {args.trials} trials x up to {args.epochs} epochs, "
        f"{args.concurrency} at a time, "
        f"digits CNN, target val_accuracy >= {args.target}, {args.seeds} seeds"
    )
    efficiency = run_efficiency(args, run_dir)
    s = efficiency["summary"]
    for method in ("tpe_asha", "random_full"):
        m = s[method]
        print(
            f"  {method:<11}  median epochs to target {m['median_epochs_to_target']:>5}  "
            f"(reached in {m['reached']}/{m['runs']})  median epochs in all "
            f"{m['median_total_epochs']:>5}  "
            f"median wall {m['median_wall_s']:.0f} s"
        )
    bound = "<= " if s["ratio_is_upper_bound"] else ""
    note = (
        (
            " (random's median run did not reach the target: compared with its "
            f"{args.trials * args.epochs}-epoch "
            "budget)"
        )
        if s["ratio_is_upper_bound"]
        else ""
    )
    print(
        f"  TPE+ASHA / random epochs to target: {bound}{s['ratio_tpe_asha_over_random']:.2f}{note} "
        " "
        f"(goal <= 0.50)"
    )
    overhead = {}
    if not args.skip_overhead:
        print("\noverhead outside training, one trial at a time (2 epochs each):")
        overhead = run_overhead(args, run_dir)
        if len(overhead) == 2:
            ratio = (
                overhead["ray_train_2_workers"]["overhead_s_per_trial"]
                / overhead["in_process"]["overhead_s_per_trial"]
            )
            print(f"  Ray Train trial / in-process trial overhead: {ratio:.1f}x")
    info["loadavg_end"] = os.getloadavg()
    print(
        f"\nload average at end {info['loadavg_end'][0]:.1f} (the machine is shared: timings are "
        "noisy)"
    )
    (out_dir / "tune_efficiency.json").write_text(
        json.dumps(
            {"machine": info, "args": vars(args), "efficiency": efficiency, "overhead": overhead},
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
