"""Kiln training throughput vs a plain PyTorch loop, and Kiln's fixed start-up cost per job.

Same model (the CNN), data (MNIST subset, 28x28), batch size and thread count, measured in one run:
1. plain PyTorch: the same tensors, a hand-written loop, no Ray (the limit);
2. Kiln: ``run_training`` with 1 Ray Train worker holding all CPUs, end to end (Ray start, MLflow,
   checkpoints every epoch, evaluation, registry).
Steady state = epochs after the first. Kiln's epoch wall time includes validation, checkpointing
and reporting; its in-loop samples/s counts the training steps only. Fixed cost = Kiln's total wall
time minus its epochs' wall time.

    python bench/train_throughput.py [--epochs 5] [--rounds 2] [--train-floor]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import print_machine  # noqa: E402


def plain_pytorch(cfg, data, epochs: int) -> list[float]:
    """samples/s per epoch of a minimal loop over the same tensors.

    It gets the allocator settings Kiln's loop applies (``keep_freed_memory``): without them its
    speed depended on what its process had freed before (glibc raises its mmap threshold to the
    largest block freed so far); a fresh process ran it at 1,860-1,950 samples/s, one with the
    settings at 2,660-3,100, the same minute: the ratio measured the baseline's luck.
    """
    import torch

    from kiln.models.artifact import build_model
    from kiln.train.loop import keep_freed_memory, model_spec

    keep_freed_memory()
    torch.manual_seed(0)
    torch.set_num_threads(int(cfg.train.cpus_per_worker))
    model = build_model(model_spec(cfg, data))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    bs = cfg.train.batch_size
    rates = []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        start = time.perf_counter()
        for i in range(0, len(x), bs):
            idx = perm[i : i + bs]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        rates.append(len(x) / (time.perf_counter() - start))
    return rates


def plain_in_ray_train(cfg, data, epochs: int) -> list[float]:
    """The same plain loop run as the training function of a one-worker TorchTrainer holding the
    same CPUs: what Ray Train's worker process costs a loop that is not Kiln's (its floor)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Path(tempfile.mkdtemp(prefix="kiln-bench-floor-")) / "rates.json"

    def loop(config: dict) -> None:
        config["out"].write_text(json.dumps(plain_pytorch(cfg, ray.get(config["data"]), epochs)))

    TorchTrainer(
        loop,
        train_loop_config={"data": ray.put(data), "out": out},
        scaling_config=ScalingConfig(
            num_workers=1, resources_per_worker={"CPU": cfg.train.cpus_per_worker}
        ),
        run_config=RunConfig(storage_path=str(out.parent), name="floor"),
    ).fit()
    return json.loads(out.read_text())


def kiln_run(cfg) -> dict:
    from kiln import tracking as trk
    from kiln.train.run import run_training

    start = time.perf_counter()
    result = run_training(cfg)
    total = time.perf_counter() - start
    epoch_ts = sorted(
        (m.step, m.timestamp)
        for m in trk.metric_history(result.tracking_uri, result.run_id, "epoch")
    )
    in_loop = sorted(
        (m.step, m.value)
        for m in trk.metric_history(result.tracking_uri, result.run_id, "samples_per_s")
    )
    wall = [(b[1] - a[1]) / 1000 for a, b in itertools.pairwise(epoch_ts)]
    n_train = result.split_sizes["train"]
    steady_epoch = statistics.median(wall)
    return {
        "total_s": total,
        "in_loop_samples_per_s": statistics.median(v for _, v in in_loop[1:]),
        "epoch_wall_samples_per_s": n_train / steady_epoch,
        "fixed_cost_s": total - steady_epoch * len(epoch_ts),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--train-floor",
        action="store_true",
        help="also run the plain loop inside a one-worker Ray Train run each round",
    )
    args = parser.parse_args()
    info = print_machine()

    import os

    from kiln.data.dataset import prepare_data
    from kiln.ray_connection import ensure_ray
    from kiln.schema import load_config

    tmp = tempfile.mkdtemp(prefix="kiln-bench-")
    # What the CLI entry sets: Ray Train's controller polls its workers every 0.5 s, not 2 s.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs/train/digits_cnn.yaml",
        [
            "experiment.name=bench-throughput",
            f"experiment.run_dir={tmp}",
            "data.source=mnist",
            "model.width=16",
            f"train.epochs={args.epochs}",
            f"train.batch_size={args.batch_size}",
            "train.workers=1",
            "train.cpus_per_worker=2",
            "train.checkpoint.keep=1",
        ],
    )
    # Start Ray outside the timed region once, so each Kiln round measures a job on a running
    # instance (the data is read in Ray Data tasks, so Ray comes first).
    t0 = time.perf_counter()
    ensure_ray(None)
    ray_start = time.perf_counter() - t0
    data = prepare_data(cfg.data)
    assert data.sample_is_whole("train")  # the plain loop trains on the same rows, in memory
    plain, kiln, floor = [], [], []
    for _ in range(args.rounds):
        plain.append(statistics.median(plain_pytorch(cfg, data, args.epochs)[1:]))
        kiln.append(kiln_run(cfg))
        if args.train_floor:
            floor.append(statistics.median(plain_in_ray_train(cfg, data, args.epochs)[1:]))
    p = statistics.median(plain)
    k_loop = statistics.median(r["in_loop_samples_per_s"] for r in kiln)
    k_wall = statistics.median(r["epoch_wall_samples_per_s"] for r in kiln)
    fixed = statistics.median(r["fixed_cost_s"] for r in kiln)
    results = {
        "machine": info,
        "model": "cnn width 16",
        "data": f"mnist subset, {len(data.y_train)} train images",
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "plain_samples_per_s": round(p, 1),
        "kiln_in_loop_samples_per_s": round(k_loop, 1),
        "kiln_epoch_wall_samples_per_s": round(k_wall, 1),
        "ratio_in_loop": round(k_loop / p, 3),
        "ratio_epoch_wall": round(k_wall / p, 3),
        # Each round's Kiln run against the plain loop measured just before it, median over the
        # rounds: the machine's speed drifts between rounds (the plain loop alone moved 2,700-3,500
        # samples/s in three quiet runs), which a ratio of medians taken apart does not cancel.
        "paired_ratio_in_loop": round(
            statistics.median(
                r["in_loop_samples_per_s"] / q for r, q in zip(kiln, plain, strict=True)
            ),
            3,
        ),
        "paired_ratio_epoch_wall": round(
            statistics.median(
                r["epoch_wall_samples_per_s"] / q for r, q in zip(kiln, plain, strict=True)
            ),
            3,
        ),
        **(
            {
                "plain_in_ray_train_samples_per_s": round(statistics.median(floor), 1),
                "paired_ratio_plain_in_ray_train": round(
                    statistics.median(f / q for f, q in zip(floor, plain, strict=True)), 3
                ),
            }
            if floor
            else {}
        ),
        # each round's (plain, Kiln in-loop, Kiln epoch wall[, floor]) samples/s, in order
        "per_round": [
            [round(q), round(r["in_loop_samples_per_s"]), round(r["epoch_wall_samples_per_s"])]
            + ([round(floor[i])] if floor else [])
            for i, (q, r) in enumerate(zip(plain, kiln, strict=True))
        ],
        "kiln_fixed_cost_per_job_s": round(fixed, 1),
        "ray_local_start_s": round(ray_start, 1),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
