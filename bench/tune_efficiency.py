"""Tuning benchmark: sample efficiency of Kiln's search against random search, many seeds, two
tasks; and the per-trial overhead of in-process and two-rank (``trial_workers: 2``) trials.

Sample efficiency. For each task, method and seed, a sweep of ``--trials`` trials of up to
``--epochs`` epochs, ``--concurrency`` at a time (the same budget and concurrency for every
method). The searcher is the one ``kiln tune`` builds (``kiln.tune.search.make_searcher``: Ray
Tune's OptunaSearch around Optuna's sampler) and the early stopping is Kiln's ASHA
(``kiln.tune.scheduler.make_scheduler``), driven here by a small in-process event loop instead of
Ray Tune's controller so that 20+ seeds fit on a small machine:
- trials train in this process with a plain torch loop on in-memory tensors (Kiln's builders and
  optimizer settings, not Kiln's Ray Data loop); one thread, seeded, so a config's learning curve
  is the same whenever it is trained, and a curve trained once is reused (random + ASHA draws the
  same configs as random + FIFO with the same seed, and stops them early);
- two trials run "at once": the running trial that has spent the fewest epochs reports next, each
  epoch counting one unit of time, whatever its measured duration (so the order of reports, and so
  every decision, does not depend on the machine's load);
- the searcher is told what Ray Tune tells it: every epoch's value (``on_trial_result``), then the
  trial's last value when it ends, whether ASHA stopped it or not (``on_trial_complete``);
- a method named ``NAME_fill`` is NAME with the budget in epochs (``tune.budget_epochs`` = trials x
  epochs): trials start until that many epochs are spent, the trials still running then are cut.

Targets are fixed before any other method runs, from random + FIFO's runs alone (which therefore
run first, for every seed): the 75th percentile of its final best per seed (the primary target:
a model random search finds in one run out of four) and the median (secondary). Per method:
epochs spent (all trials, in report order) until a trial first reaches the target; a run that
never reaches it counts as the whole budget (trials x epochs, what random + FIFO spends), a lower
bound of its true cost; the share of seeds reaching it; training seconds until then (measured
epoch times, summed over trials; excludes per-trial overhead); the ratio of median epochs to
random + FIFO's, with a 90% bootstrap interval (seeds resampled, paired, 2000 times).

Overhead (needs Ray, skipped by --skip-overhead and --quick): one trial at a time, the sweep's
wall time minus the time spent in epochs, per trial, for in-process trials and for trials of two
ranks (``trial_workers: 2``), the same number of each (real ``kiln.tune.sweep.run_sweep`` sweeps).

Usage: python bench/tune_efficiency.py [--seeds 20] [--tasks digits_cnn imbalanced_mlp]
         [--methods ...] [--trials 12] [--epochs 4] [--skip-overhead] [--quick]
(the budget is trials x epochs: --trials 24 for BENCHMARKS' 96-epoch runs)
Runs are appended to OUT/tune_efficiency_runs.jsonl as they finish, and a run already there (same
task, method, seed and budget) is not run again: an interrupted benchmark continues where it was.
Prints the report and writes OUT/tune_efficiency.json and OUT/tune_efficiency_<task>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "bench"))
# Ray's worker processes (overhead section) import kiln too: from this checkout, like this process.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT / "platform"), os.environ.get("PYTHONPATH")) if p
)

# Wide spaces, as a first sweep over an unfamiliar model would use: much of each trains badly in a
# few epochs (learning rates far off, tiny widths, heavy weight decay or dropout).
DIGITS_SPACE = {
    "train.lr": {"loguniform": [1.0e-5, 1.0]},
    "train.optimizer": {"choice": ["adamw", "sgd"]},
    "train.batch_size": {"choice": [32, 64, 128, 256]},
    "train.weight_decay": {"loguniform": [1.0e-6, 3.0e-1]},
    "model.width": {"int": [2, 24]},
    "model.dropout": {"uniform": [0.0, 0.8]},
}
MLP_SPACE = {
    "train.lr": {"loguniform": [1.0e-5, 1.0]},
    "train.optimizer": {"choice": ["adamw", "adam", "sgd"]},
    "train.batch_size": {"choice": [32, 64, 128, 256]},
    "train.weight_decay": {"loguniform": [1.0e-6, 3.0e-1]},
    "train.class_weights": {"choice": ["none", "auto"]},
    "model.hidden": {"choice": [[16], [64], [128, 64], [256, 128], [64, 64, 64]]},
    "model.dropout": {"uniform": [0.0, 0.7]},
}


def quarter_gamma(n: int) -> int:
    """TPE's "good" group: a quarter of the trials, at most 25 (Optuna's default is a tenth)."""
    return min(math.ceil(0.25 * n), 25)


# name -> (searcher, ASHA settings or None for FIFO, TPESampler overrides). ASHA settings are
# Kiln's defaults (grace 1, reduction 2, one bracket) unless named.
METHODS: dict[str, tuple[str, dict[str, Any] | None, dict[str, Any]]] = {
    "random_fifo": ("random", None, {}),
    "random_asha": ("random", {}, {}),
    # Kiln's default: Optuna 5's TPE defaults (multivariate for one objective) with 4 random
    # start-up trials and the constant liar when trials run concurrently, ASHA (grace 1, r 2).
    "tpe_asha": ("tpe", {}, {}),
    "tpe_fifo": ("tpe", None, {}),
    "tpe_uni_asha": ("tpe", {}, {"multivariate": False}),  # independent TPE (Optuna < 5)
    "tpe_nolie_asha": ("tpe", {}, {"constant_liar": False}),
    "tpe_s2_asha": ("tpe", {}, {"n_startup_trials": 2}),
    "tpe_s8_asha": ("tpe", {}, {"n_startup_trials": 8}),
    "tpe_asha_rf3": ("tpe", {"reduction_factor": 3}, {}),
    "tpe_asha_g2": ("tpe", {"grace_period": 2}, {}),
    # independent TPE combined with the other settings that helped on one task
    "tpe_uni_nolie_asha": ("tpe", {}, {"multivariate": False, "constant_liar": False}),
    "tpe_uni_asha_rf3": ("tpe", {"reduction_factor": 3}, {"multivariate": False}),
    "tpe_uni_s8_asha": ("tpe", {}, {"multivariate": False, "n_startup_trials": 8}),
    "tpe_asha_b2": ("tpe", {"brackets": 2}, {}),
    "tpe_uni_asha_b2": ("tpe", {"brackets": 2}, {"multivariate": False}),
    "tpe_uni_asha_g2": ("tpe", {"grace_period": 2}, {"multivariate": False}),
    # the searcher and ASHA see the metric minus TIE_WEIGHT x validation loss: accuracy is coarse
    # (1/270 on digits' validation split) and many configs tie at the top; the loss orders them
    "tpe_tie_asha": ("tpe", {}, {"tie_break": True}),
    "tpe_uni_tie_asha": ("tpe", {}, {"multivariate": False, "tie_break": True}),
    # how TPE weighs what it has seen: more candidates per proposal (exploits its model harder),
    # and a larger "good" group (a quarter of the trials, not a tenth: a smoother model of it)
    "tpe_ei64_asha": ("tpe", {}, {"n_ei_candidates": 64}),
    "tpe_uni_ei64_asha": ("tpe", {}, {"multivariate": False, "n_ei_candidates": 64}),
    "tpe_g25_asha": ("tpe", {}, {"gamma": quarter_gamma}),
    "tpe_uni_g25_asha": ("tpe", {}, {"multivariate": False, "gamma": quarter_gamma}),
    # a broader start, then a model exploited harder: the digits seeds that miss never find the
    # good region, and more candidates per proposal helped the seeds that did
    "tpe_s8_ei64_asha": ("tpe", {}, {"n_startup_trials": 8, "n_ei_candidates": 64}),
}
TIE_WEIGHT = 1e-4  # x a loss of at most LOSS_CAP: below digits' accuracy step (1/270 = 0.0037)
LOSS_CAP = 10.0
BASELINE = "random_fifo"
# What BENCHMARKS.md reports by default: the baselines, Kiln's search sized in trials and in epochs,
# and the two searcher settings that led on one task each.
HEADLINE_METHODS = (
    "random_fifo",
    "random_asha",
    "tpe_asha",
    "random_asha_fill",
    "tpe_asha_fill",
    "tpe_uni_asha_fill",
    "tpe_nolie_asha_fill",
)
# A method named NAME_fill runs NAME with the sweep's budget in epochs (trials x epochs) instead of
# in trials: a trial starts whenever one ends until that many epochs are spent, and the trials
# still running then are cut. FIFO methods spend the same epochs either way; ASHA ones, which stop
# most trials early, get to try more configurations for the same compute.
FILL = "_fill"


def method_settings(method: str) -> tuple[tuple[str, dict[str, Any] | None, dict[str, Any]], bool]:
    """(METHODS entry, fill the epoch budget?) for a method name."""
    fill = method.endswith(FILL)
    return METHODS[method[: -len(FILL)] if fill else method], fill


@dataclass
class Task:
    name: str
    space: dict[str, Any]
    metric: str  # val_accuracy or val_f1_macro, maximized
    x: dict[str, Any] = field(default_factory=dict)  # split -> float32 tensor
    y: dict[str, Any] = field(default_factory=dict)  # split -> int64 tensor
    num_classes: int = 0


def _split(x, y, seed: int = 0):
    """Stratified 70/15/15 split, seeded (train, val; the test part is not used here)."""
    from sklearn.model_selection import train_test_split

    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=seed
    )
    x_val, _, y_val, _ = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    return (x_train, y_train), (x_val, y_val)


def load_task(name: str) -> Task:
    """The task's data as tensors: the digits images (8x8, scaled to [0, 1]) for the CNN, or an
    imbalanced 4-class table (80/12/5/3 %, standardized on the train split) for the MLP."""
    import numpy as np
    import torch

    if name == "digits_cnn":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (bunch.images / 16.0).astype(np.float32)[:, None]
        task = Task(name, DIGITS_SPACE, "val_accuracy", num_classes=10)
        (xt, yt), (xv, yv) = _split(x, bunch.target)
    elif name == "imbalanced_mlp":
        from sklearn.datasets import make_classification

        x, y = make_classification(
            n_samples=2400,
            n_features=20,
            n_informative=6,
            n_redundant=4,
            n_classes=4,
            weights=[0.80, 0.12, 0.05, 0.03],
            class_sep=0.8,
            flip_y=0.02,
            random_state=0,
        )
        (xt, yt), (xv, yv) = _split(x.astype(np.float32), y)
        mean, std = xt.mean(0), xt.std(0) + 1e-6
        xt, xv = (xt - mean) / std, (xv - mean) / std
        task = Task(name, MLP_SPACE, "val_f1_macro", num_classes=4)
    else:
        raise SystemExit(f"unknown task {name}")
    task.x = {"train": torch.from_numpy(xt), "val": torch.from_numpy(xv)}
    task.y = {"train": torch.from_numpy(yt).long(), "val": torch.from_numpy(yv).long()}
    return task


def _metric(task: Task, logits, y) -> float:
    pred = logits.argmax(1)
    if task.metric == "val_accuracy":
        return float((pred == y).float().mean())
    f1s = []
    for c in range(task.num_classes):
        tp = float(((pred == c) & (y == c)).sum())
        fp = float(((pred == c) & (y != c)).sum())
        fn = float(((pred != c) & (y == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(f1s) / len(f1s)


def train_curve(task: Task, params: dict[str, Any], epochs: int, seed: int = 0):
    """Yield (validation metric, seconds, validation loss) after each epoch of one trial's config.

    The trial as Kiln trains it, in memory: Kiln's model builder, its optimizers (SGD with Nesterov
    momentum 0.9, Adam, AdamW), its cosine schedule over the trial's epochs, its class weights.
    """
    import numpy as np
    import torch
    from torch import nn

    from kiln.data.dataset import class_weights
    from kiln.models.builders import build_cnn, build_mlp

    torch.manual_seed(seed)
    shape = list(task.x["train"].shape[1:])
    dropout = float(params.get("model.dropout", 0.1))
    if task.name == "digits_cnn":
        model = build_cnn(
            shape, task.num_classes, width=int(params["model.width"]), dropout=dropout
        )
    else:
        model = build_mlp(shape, task.num_classes, hidden=params["model.hidden"], dropout=dropout)
    lr, wd, name = params["train.lr"], params["train.weight_decay"], params["train.optimizer"]
    if name == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, weight_decay=wd, nesterov=True
        )
    else:
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        opt = cls(model.parameters(), lr=lr, weight_decay=wd)
    x, y = task.x["train"], task.y["train"]
    batch = int(params["train.batch_size"])
    steps = max(1, math.ceil(len(y) / batch))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    weights = None
    if params.get("train.class_weights") == "auto":
        weights = torch.from_numpy(
            class_weights(np.bincount(y.numpy(), minlength=task.num_classes))
        )
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    for epoch in range(epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1009 + epoch))
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            if not torch.isfinite(loss):
                break  # diverged: the rest of the epoch changes nothing useful
            loss.backward()
            opt.step()
            schedule.step()
        model.eval()
        with torch.inference_mode():
            logits = model(task.x["val"])
        finite = bool(torch.isfinite(logits).all())
        value = _metric(task, logits, task.y["val"]) if finite else 0.0
        val_loss = float(nn.functional.cross_entropy(logits, task.y["val"])) if finite else LOSS_CAP
        yield value, time.perf_counter() - started, min(val_loss, LOSS_CAP)


class Curves:
    """Learning curves by (task, config): each config is trained at most once per length."""

    def __init__(self) -> None:
        self.known: dict[tuple[str, str], list[tuple[float, float, float]]] = {}

    def epoch(self, task: Task, params: dict[str, Any], epochs: int, k: int, live: dict):
        """(metric, seconds, validation loss) of epoch ``k`` (0-based) of ``params``; ``live``
        holds the trial's running generator when the curve has to be trained."""
        key = (task.name, json.dumps(params, sort_keys=True))
        curve = self.known.setdefault(key, [])
        if k < len(curve):
            return curve[k]
        if "gen" not in live:
            live["gen"] = train_curve(task, params, epochs)
            for _ in range(k):  # replay the epochs already known (same seed: the same model)
                next(live["gen"])
        value = next(live["gen"])
        curve.append(value)
        return value


@dataclass
class SimTrial:
    number: int
    trial_id: str
    encoded: dict[str, Any]
    params: dict[str, Any]
    clock: int  # epochs of simulated time at which this trial's next report happens, minus one
    done: int = 0
    live: dict = field(default_factory=dict)


def run_method(
    task: Task, method: str, seed: int, trials: int, epochs: int, concurrency: int, curves: Curves
) -> dict[str, Any]:
    """One sweep of ``method`` on ``task``. Returns its trace: every report in order."""
    import numpy as np
    from ray.tune.schedulers import TrialScheduler

    from kiln.tune.config import AshaConfig, Objective, TuneConfig
    from kiln.tune.scheduler import make_scheduler
    from kiln.tune.search import make_searcher
    from kiln.tune.space import decode_params, parse_space

    (searcher_kind, asha, tpe_options), fill = method_settings(method)
    tpe_options = dict(tpe_options)
    tie_break = bool(tpe_options.pop("tie_break", False))
    budget = trials * epochs
    t = TuneConfig(
        space=task.space,
        objectives=[Objective(metric=task.metric, mode="max")],
        searcher=searcher_kind,
        seed=seed,
        num_samples=trials,
        max_epochs=epochs,
        max_concurrent_trials=concurrency,
        asha=AshaConfig(**asha) if asha is not None else None,
    )
    dims = parse_space(t.space)
    searcher = make_searcher(t, dims, concurrency, **tpe_options)
    np.random.seed(seed)  # ASHA draws a bracket with numpy's global generator
    with tempfile.TemporaryDirectory(prefix="kiln-bench-asha-") as tmp:
        scheduler = make_scheduler(t, epochs, Path(tmp))
        running: list[SimTrial] = []
        created, now, trace, stopped = 0, 0, [], 0

        def more() -> bool:
            return len(trace) < budget if fill else created < trials

        while running or more():
            while len(running) < concurrency and more():
                created += 1
                tid = f"t{created:04d}"
                encoded = searcher.suggest(tid)
                trial = SimTrial(created, tid, encoded, decode_params(dims, encoded), now)
                if scheduler is not None:
                    scheduler.on_trial_add(None, trial)
                running.append(trial)
            trial = min(running, key=lambda r: (r.clock, r.number))
            value, seconds, val_loss = curves.epoch(
                task, trial.params, epochs, trial.done, trial.live
            )
            trial.done += 1
            trial.clock += 1
            now = trial.clock
            result = {
                "epochs_done": trial.done,
                "training_iteration": trial.done,
                # what the searcher and ASHA rank by: the metric, ties broken by validation loss
                task.metric: value - TIE_WEIGHT * val_loss if tie_break else value,
            }
            trace.append([trial.number, trial.done, round(value, 6), round(seconds, 4)])
            searcher.on_trial_result(trial.trial_id, result)
            decision = (
                scheduler.on_trial_result(None, trial, result)
                if scheduler is not None
                else TrialScheduler.CONTINUE
            )
            if decision == TrialScheduler.STOP or trial.done >= epochs:
                stopped += trial.done < epochs
                searcher.on_trial_complete(trial.trial_id, result)
                if scheduler is not None:
                    scheduler.on_trial_complete(None, trial, result)
                running.remove(trial)
            if fill and len(trace) >= budget:
                break  # the budget is spent: the trials still running are cut
    return {
        "task": task.name,
        "method": method,
        "seed": seed,
        "trials": trials,
        "epochs": epochs,
        "concurrency": concurrency,
        "trace": trace,  # [trial, epochs done, metric, seconds] per report, in report order
        "stopped_early": stopped,
        "trials_started": created,
    }


# --- analysis ------------------------------------------------------------------------------------


def final_best(run: dict) -> float:
    return max((r[2] for r in run["trace"]), default=0.0)


def to_target(run: dict, target: float) -> tuple[int, float, bool]:
    """(epochs, training seconds, reached): spent until a report first reaches ``target``; a run
    that never does counts as the whole budget (and its own measured seconds)."""
    seconds = 0.0
    for i, (_, _, value, secs) in enumerate(run["trace"], start=1):
        seconds += secs
        if value >= target:
            return i, seconds, True
    return run["trials"] * run["epochs"], seconds, False


def best_so_far(run: dict, budget: int) -> list[float]:
    """Best metric seen after 1..budget epochs spent (flat after the run ended)."""
    out, best = [], 0.0
    values = [r[2] for r in run["trace"]]
    for e in range(budget):
        if e < len(values):
            best = max(best, values[e])
        out.append(best)
    return out


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]), as numpy's default."""
    import numpy as np

    return float(np.percentile(values, q))


def bootstrap_ratio(
    method: list[float], base: list[float], rounds: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(ratio of medians, 5th and 95th percentile over bootstrap resamples of the paired seeds)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    a, b = np.asarray(method, float), np.asarray(base, float)
    ratio = float(np.median(a) / np.median(b))
    idx = rng.integers(0, len(a), size=(rounds, len(a)))
    ratios = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    return ratio, float(np.percentile(ratios, 5)), float(np.percentile(ratios, 95))


def analyse(runs: list[dict], task: str, methods: list[str]) -> dict[str, Any]:
    """Targets (from random + FIFO alone) and each method's numbers on ``task``."""
    by = {
        m: sorted(
            (r for r in runs if r["task"] == task and r["method"] == m), key=lambda r: r["seed"]
        )
        for m in methods
    }
    base = by[BASELINE]
    finals = [final_best(r) for r in base]
    targets = {"p75": percentile(finals, 75), "p50": percentile(finals, 50)}
    out: dict[str, Any] = {"targets": targets, "seeds": len(base), "methods": {}}
    for m in methods:
        mine = {r["seed"]: r for r in by[m]}
        seeds = [r["seed"] for r in base if r["seed"] in mine]
        row: dict[str, Any] = {
            "seeds": len(seeds),
            "median_final_best": statistics.median(final_best(mine[s]) for s in seeds)
            if seeds
            else None,
            "median_epochs_in_all": statistics.median(len(mine[s]["trace"]) for s in seeds)
            if seeds
            else None,
        }
        for name, target in targets.items():
            if not seeds:
                continue
            hits = [to_target(mine[s], target) for s in seeds]
            base_hits = [to_target(next(r for r in base if r["seed"] == s), target) for s in seeds]
            epochs = [float(h[0]) for h in hits]
            ratio, low, high = bootstrap_ratio(epochs, [float(h[0]) for h in base_hits])
            row[name] = {
                "median_epochs": statistics.median(epochs),
                # fewer than half the seeds reached it: the median is the budget, a lower bound
                "median_censored": 2 * sum(h[2] for h in hits) <= len(hits),
                "median_seconds": statistics.median(h[1] for h in hits),
                "reached": sum(h[2] for h in hits),
                "ratio_to_random_fifo": ratio,
                "ratio_ci90": [low, high],
            }
        out["methods"][m] = row
    return out


def plot(runs: list[dict], task: str, methods: list[str], targets: dict, path: Path) -> bool:
    """Best-so-far against epochs spent: median and quartiles over seeds, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    budget = 0
    for m in methods:
        mine = [r for r in runs if r["task"] == task and r["method"] == m]
        if not mine:
            continue
        budget = mine[0]["trials"] * mine[0]["epochs"]
        curves = np.array([best_so_far(r, budget) for r in mine])
        x = np.arange(1, budget + 1)
        q1, med, q3 = np.percentile(curves, [25, 50, 75], axis=0)
        (line,) = ax.plot(x, med, label=f"{m} ({len(mine)} seeds)")
        ax.fill_between(x, q1, q3, alpha=0.15, color=line.get_color())
    for name, value in targets.items():
        ax.axhline(value, ls="--", lw=0.8, color="grey")
        ax.text(budget, value, f" target {name}", va="bottom", ha="right", fontsize=8)
    metric = next(r for r in runs if r["task"] == task)
    ax.set_xlabel("epochs spent (all trials)")
    ax.set_ylabel("best validation metric so far")
    ax.set_title(
        f"{task}: best so far (median, quartiles over seeds), "
        f"budget {metric['trials'] * metric['epochs']} epochs",
        fontsize=10,
    )
    finals = [final_best(r) for r in runs if r["task"] == task]
    low, high = percentile(finals, 5), max(finals)
    margin = max(0.01, 0.25 * (high - low))
    ax.set_ylim(max(0.0, low - margin), min(1.0, high + margin))
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def report(analysis: dict[str, Any], task: str, methods: list[str]) -> None:
    a = analysis
    t = a["targets"]
    print(
        f"\n{task}: targets from random_fifo's {a['seeds']} seeds: "
        f"p75 {t['p75']:.4f} (primary), p50 {t['p50']:.4f}"
    )
    for name in ("p75", "p50"):
        print(f"  target {name}:")
        print(
            f"    {'method':<15} {'seeds':>5} {'reached':>8} {'med epochs':>10} "
            f"{'med train s':>11} {'ratio':>6} {'90% CI':>14}"
        )
        for m in methods:
            row = a["methods"][m]
            if name not in row:
                continue
            r = row[name]
            print(
                f"    {m:<15} {row['seeds']:>5} {r['reached']:>4}/{row['seeds']:<3} "
                f"{('>=' if r['median_censored'] else '') + format(r['median_epochs'], '.1f'):>10} "
                f"{r['median_seconds']:>11.1f} "
                f"{r['ratio_to_random_fifo']:>6.2f} "
                f"[{r['ratio_ci90'][0]:.2f}, {r['ratio_ci90'][1]:.2f}]"
            )
    print("    (>=: fewer than half the seeds reached the target; the median is the budget)")
    print(f"    {'method':<15} median final best, median epochs in all:")
    for m in methods:
        row = a["methods"][m]
        if row["seeds"]:
            print(f"    {m:<15} {row['median_final_best']:.4f}  {row['median_epochs_in_all']}")


# --- overhead (real sweeps on Ray) ----------------------------------------------------------------


def sweep_config(run_dir: Path, name: str, trials: int, epochs: int, trial_workers: int):
    from kiln.config import read_yaml
    from kiln.schema import validate_config

    data = read_yaml(ROOT / "configs/train/digits_cnn.yaml")
    data["experiment"] = {"name": name, "run_dir": str(run_dir)}
    data["model"] = {"name": "cnn", "width": 16, "dropout": 0.1}
    data["train"].update(epochs=epochs, seed=0)
    data["tune"] = {
        "name": name,
        "space": {"train.lr": {"loguniform": [1.0e-3, 1.0e-2]}},
        "searcher": "random",
        "num_samples": trials,
        "max_epochs": epochs,
        "max_concurrent_trials": 1,
        "cpus_per_worker": 0.5,
        "trial_workers": trial_workers,
        "asha": None,
    }
    return validate_config(data)


def run_overhead(args, run_dir: Path) -> dict:
    """Seconds per trial outside epochs, one trial at a time: in-process trials against trials of
    two ranks (``trial_workers: 2``: the trial's process and one peer actor, DDP), the same number
    of each. Their difference is what the second rank costs a trial; the sweep's own fixed cost
    (start, test evaluation, registry), spread over the trials, is in both and cancels there."""
    from kiln.data.dataset import prepare_data
    from kiln.ray_connection import ensure_ray
    from kiln.tune.sweep import run_sweep

    ensure_ray(None, num_cpus=2)
    out = {}
    for kind, workers, trials in (
        ("in_process", 1, args.overhead_trials),
        ("two_ranks", 2, args.overhead_trials),
    ):
        cfg = sweep_config(run_dir, f"bench-overhead-{kind}", trials, 2, workers)
        started = time.monotonic()
        result = run_sweep(cfg)
        wall = time.monotonic() - started
        # Trials time each epoch (train, validate, checkpoint); a Ray Train run (GPU trials)
        # reports its training throughput only, so there the time in epochs is training time.
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


# --- main ----------------------------------------------------------------------------------------


def load_runs(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", default=["digits_cnn", "imbalanced_mlp"])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(HEADLINE_METHODS),
        help=f"any of {sorted(METHODS)}, each also as NAME{FILL} (the budget in epochs)",
    )
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--report-only", action="store_true", help="analyse the runs saved in OUT")
    parser.add_argument("--overhead-trials", type=int, default=6)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 seeds, digits only, 4 trials x 2 epochs, 4 methods, no overhead (the test suite's)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.tasks, args.trials, args.epochs = 2, ["digits_cnn"], 4, 2
        args.methods = ["random_fifo", "random_asha", "tpe_asha", "tpe_asha_fill"]
        args.skip_overhead = True
    if BASELINE not in args.methods:
        args.methods.insert(0, BASELINE)
    # The process set-up of Kiln's entry points (environment defaults read when Ray, the Tuner and
    # TorchTrainer start; Ray Data's progress bars off: Tune's trial stdout cannot draw them).
    from kiln.cli import configure_process

    configure_process()

    import optuna
    import torch

    from machine import machine_info

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)  # deterministic curves, and one core of the two per process
    args.out.mkdir(parents=True, exist_ok=True)
    runs_path = args.out / "tune_efficiency_runs.jsonl"
    info = machine_info()
    print(f"machine: {info}")
    print(
        f"sample efficiency: {args.trials} trials x up to {args.epochs} epochs, "
        f"{args.concurrency} at a time, seeds {args.first_seed}..{args.first_seed + args.seeds - 1}"
        f", tasks {args.tasks}, methods {args.methods}",
        flush=True,
    )
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    runs = load_runs(runs_path)

    def have(task: str, method: str, seed: int) -> bool:
        return any(
            r["task"] == task
            and r["method"] == method
            and r["seed"] == seed
            and r["trials"] == args.trials
            and r["epochs"] == args.epochs
            and r["concurrency"] == args.concurrency
            for r in runs
        )

    started = time.monotonic()
    if not args.report_only:
        for task_name in args.tasks:
            task, curves = load_task(task_name), Curves()
            # random + FIFO first for every seed: the targets come from it alone.
            # Then seed by seed, every method in turn: a run cut short has every method on the
            # same (fewer) seeds.
            order = [(BASELINE, s) for s in seeds] + [
                (m, s) for s in seeds for m in args.methods if m != BASELINE
            ]
            for method, seed in order:
                if have(task_name, method, seed):
                    continue
                run = run_method(
                    task, method, seed, args.trials, args.epochs, args.concurrency, curves
                )
                runs.append(run)
                with runs_path.open("a") as fh:
                    fh.write(json.dumps(run) + "\n")
                print(
                    f"  {task_name} {method:<15} seed {seed:>2}: final best "
                    f"{final_best(run):.4f}, {len(run['trace'])} epochs, "
                    f"{run['stopped_early']} stopped early "
                    f"[{time.monotonic() - started:.0f} s]",
                    flush=True,
                )
    selected = [
        r
        for r in runs
        if r["trials"] == args.trials
        and r["epochs"] == args.epochs
        and r["concurrency"] == args.concurrency
        and r["seed"] in seeds
    ]
    results: dict[str, Any] = {}
    for task_name in args.tasks:
        methods = [
            m
            for m in args.methods
            if any(r["task"] == task_name and r["method"] == m for r in selected)
        ]
        if BASELINE not in methods:
            continue
        analysis = analyse(selected, task_name, methods)
        png = args.out / f"tune_efficiency_{task_name}.png"
        analysis["plot"] = (
            str(png) if plot(selected, task_name, methods, analysis["targets"], png) else None
        )
        report(analysis, task_name, methods)
        results[task_name] = analysis
    overhead = {}
    if not args.skip_overhead and not args.report_only:
        print("\noverhead outside training, one trial at a time (2 epochs each):")
        overhead = run_overhead(args, args.out / "tune_runs")
        if len(overhead) == 2:
            extra = (
                overhead["two_ranks"]["overhead_s_per_trial"]
                - overhead["in_process"]["overhead_s_per_trial"]
            )
            print(f"  what the second rank adds to a trial: {extra:.1f} s")
    info["load_avg_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nload average at end {info['load_avg_end']} (a shared machine: timings are noisy)")
    (args.out / "tune_efficiency.json").write_text(
        json.dumps(
            {
                "machine": info,
                "args": {k: str(v) for k, v in vars(args).items()},
                "efficiency": results,
                "overhead": overhead,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
