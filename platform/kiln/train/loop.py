"""The training loop: a plain function over (config, data, session).

It runs in-process (LocalSession) and inside Ray Train workers (RayTrainSession) alike. Each
epoch it reports train/val metrics and, every ``train.checkpoint.every`` epochs, a checkpoint.
Rank 0 also logs the epoch's metrics to MLflow once the checkpoint is persisted, so an epoch
visible in MLflow is an epoch that will not be repeated after a restart.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.data.dataset import PreparedData, open_splits
from kiln.models.artifact import build_model, unwrap
from kiln.models.spec import ModelSpec
from kiln.train.checkpoint import checkpoint_name, load_checkpoint, read_state, save_checkpoint
from kiln.train.config import TrainDataConfig, TrainingJobConfig
from kiln.train.metrics import accuracy, confusion_matrix, f1_macro
from kiln.train.session import Session


@dataclass
class LoopHooks:
    """Ways a job kind changes the loop without copying it (compression uses them).

    ``build_model``: the starting model (e.g. a pruned network) instead of a fresh one from
    ``spec``. ``spec``: the spec saved with checkpoints (defaults to the config's architecture).
    ``loss``: ``loss(logits, xb, yb, ce_loss) -> loss`` instead of cross-entropy (e.g.
    distillation).
    """

    build_model: Callable[[], nn.Module] | None = None
    spec: ModelSpec | None = None
    loss: Callable[..., torch.Tensor] | None = None


def model_spec(cfg: TrainingJobConfig, data: PreparedData) -> ModelSpec:
    return ModelSpec(
        architecture=cfg.model.name,
        kwargs=cfg.model.kwargs,
        input_shape=data.input_shape,
        labels=data.labels,
        preprocessing=data.preprocessing,
    )


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# glibc's malloc hands a freed block of more than its mmap threshold (128 KB at first, raised to the
# last such block freed, at most 32 MB) back to the OS, and trims its heap's free top above 2x that:
# the activations of every training step (6 MB a tensor for the benchmark's CNN at batch 128) were
# mapped, faulted in page by page and unmapped again, 110,000-270,000 page faults per epoch of 28
# steps. Fixed thresholds keep freed blocks for the next step: 1 fault per epoch, the steps 7-50%
# faster in one process (peak RSS +40-60 MB of 780). Blocks over 32 MB are still mapped apart.
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 512 << 20


def keep_freed_memory() -> bool:
    """Let this process's allocator (glibc) keep freed blocks of up to MMAP_THRESHOLD_BYTES and up
    to TRIM_THRESHOLD_BYTES free at its heap's top for reuse, instead of returning them to the OS
    after each step. Returns whether it was applied (glibc only; elsewhere nothing changes).
    It governs the main heap: a thread's own arena unmaps its heaps whatever these thresholds, so
    Kiln's jobs start their workers on one arena (``kiln.ray_connection.JOB_WORKER_ENV``)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(m_trim_threshold, TRIM_THRESHOLD_BYTES)
    )


def make_optimizer(cfg: TrainingJobConfig, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=t.lr, momentum=0.9, weight_decay=t.weight_decay, nesterov=True
        )
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def make_scheduler(cfg: TrainingJobConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    if cfg.train.scheduler == "none":
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, cfg.train.epochs * steps_per_epoch)
    )


SHUFFLE_BUFFER_BYTES = 256 << 20  # the shuffle buffer's cap, whatever train.data.shuffle_buffer
# The most a worker keeps of the validation split for later epochs (bench/data_scale.py: a 16x
# table's split held at the old 256 MB took the worker's peak 1.48x above the 1x table's).
HELD_SPLIT_BYTES = 128 << 20
FETCH_BYTES = 8 << 20  # the least a batch fetched from Ray Data holds when rows go into the buffer
EVAL_BATCH = 1024  # the least rows per validation step on a GPU (a CPU uses the training batch)


@dataclass
class HeldRows:
    """A worker's split held in memory once streamed whole within its budget (the shuffle buffer's
    cap for train, HELD_SPLIT_BYTES for validation): later epochs draw from it instead of
    streaming it from Ray Data again. Larger splits stream every epoch, never held. The rows are
    kept in the chunks they arrived in: joining them would hold a second copy while it is made."""

    chunks: list[dict[str, torch.Tensor]] | None = None

    def kept(self, later: bool) -> HeldRows | None:
        """Itself where it holds rows or a later pass will read them; else None (stream only)."""
        return self if later or self.chunks is not None else None


def _cut(pool: dict[str, torch.Tensor], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    for i in range(0, len(pool["y"]), batch_size):
        yield {k: v[i : i + batch_size] for k, v in pool.items()}


def _joined(chunks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if len(chunks) == 1:
        return chunks[0]
    return {k: torch.cat([b[k] for b in chunks]) for k in chunks[0]}


def _permuted(rows: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    order = torch.randperm(len(rows["y"]), generator=generator)
    return {k: v[order] for k, v in rows.items()}


def shuffle_stream(
    batches: Any,
    batch_size: int,
    buffer_rows: int,
    generator: torch.Generator,
    held: HeldRows | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``batch_size`` rows drawn through a seeded shuffle buffer of ``buffer_rows``.

    When the buffer is full it is permuted and its first half leaves as full batches; the rest is
    permuted and emitted at the end. A buffer as large as the shard is a full shuffle. The draws
    depend only on the generator and the order rows arrive in (fixed for a cached split), and every
    batch but the last is full, so ranks with equal rows take equal steps. A shard that never
    filled the buffer is kept in ``held``; given one, ``batches`` is not read: the same draws come
    from the rows it holds (in the order they first arrived)."""
    if held is not None and held.chunks is not None:
        yield from _cut(_permuted(_joined(held.chunks), generator), batch_size)
        return
    chunks: list[dict[str, torch.Tensor]] = []
    rows, whole = 0, True
    for batch in batches:
        chunks.append(batch)
        rows += len(batch["y"])
        if rows >= buffer_rows + batch_size:
            whole = False
            pool = _permuted(_joined(chunks), generator)
            out = (rows // 2) // batch_size * batch_size
            yield from _cut({k: v[:out] for k, v in pool.items()}, batch_size)
            chunks, rows = [{k: v[out:] for k, v in pool.items()}], rows - out
    if rows:
        rest = _joined(chunks)
        if whole and held is not None:
            held.chunks = [rest]
        yield from _cut(_permuted(rest, generator), batch_size)


def train_batches(
    source: Any,
    batch_size: int,
    knobs: TrainDataConfig,
    row_bytes: int,
    generator: torch.Generator,
    held: HeldRows | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of ``{"x", "y"}`` torch batches from a dataset or a worker's shard, prefetching
    ``train.data.prefetch_batches`` batches, shuffled through a seeded buffer of
    ``train.data.shuffle_buffer`` rows (at most 256 MB); a shard that fits the buffer is streamed
    once and then kept in ``held`` (see ``shuffle_stream``). Ray Data's own local shuffle is not
    used: its order was seen to change between two iterations with the same seed."""
    buffer_rows = min(knobs.shuffle_buffer, SHUFFLE_BUFFER_BYTES // max(row_bytes, 1))
    # Rows come from Ray Data in chunks of at least FETCH_BYTES, cut into steps here: Ray Data's
    # cost is per batch it formats (several ms), the cut is a view. Into a shuffle buffer, chunks
    # change nothing but the order rows arrive in, which stays fixed for a given split.
    fetch = batch_size
    if buffer_rows > 0:
        fetch = max(batch_size, min(buffer_rows, FETCH_BYTES // max(row_bytes, 1)))
    batches = source.iter_torch_batches(
        batch_size=fetch,
        prefetch_batches=knobs.prefetch_batches,
        dtypes={"x": torch.float32, "y": torch.int64},
        device="cpu",
    )
    if buffer_rows <= 0:
        return iter(batches)
    return shuffle_stream(batches, batch_size, buffer_rows, generator, held)


def eval_batches(
    source: Any,
    batch_size: int,
    held: HeldRows | None,
    budget_bytes: int,
    fetch_rows: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """A split's ``{"x", "y"}`` batches of ``batch_size`` rows for evaluation, in Ray Data's order;
    rows are fetched from Ray Data ``fetch_rows`` at a time (default ``batch_size``) and cut into
    steps. A split of at most ``budget_bytes`` is kept in ``held`` after its first pass (as the
    fetched chunks, so the steps read from memory are the streamed ones) and read from there
    afterwards."""
    if held is not None and held.chunks is not None:
        for chunk in held.chunks:
            yield from _cut(chunk, batch_size)
        return
    chunks: list[dict[str, torch.Tensor]] | None = [] if held is not None else None
    size = 0
    for chunk in source.iter_torch_batches(
        batch_size=max(batch_size, fetch_rows or batch_size),
        dtypes={"x": torch.float32, "y": torch.int64},
        device="cpu",
    ):
        yield from _cut(chunk, batch_size)
        if chunks is not None:
            size += sum(v.numel() * v.element_size() for v in chunk.values())
            if size > budget_bytes:
                chunks = None  # too large to hold: let go of what was kept, stream it each time
            else:
                chunks.append(chunk)
    if held is not None and chunks:
        held.chunks = chunks


@torch.inference_mode()
def stream_metrics(
    model: nn.Module,
    source: Any,
    num_classes: int,
    loss_fn,
    prefix: str,
    device: Any = "cpu",
    batch_size: int = 1024,
    held: HeldRows | None = None,
    fetch_rows: int | None = None,
) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of ``model`` on one split, in steps of ``batch_size`` rows
    fetched ``fetch_rows`` at a time (empty split: no metrics); ``held`` keeps a split of at most
    HELD_SPLIT_BYTES for the next call."""
    model.eval()
    cm = np.zeros((num_classes, num_classes), np.int64)
    loss_sum, rows = 0.0, 0.0
    reduction = getattr(loss_fn, "reduction", "mean")
    for batch in eval_batches(source, batch_size, held, HELD_SPLIT_BYTES, fetch_rows):
        x, y = batch["x"].to(device), batch["y"].to(device)
        logits = model(x)
        cm += confusion_matrix(y.cpu().numpy(), logits.argmax(1).cpu().numpy(), num_classes)
        if getattr(loss_fn, "weight", None) is not None and reduction == "mean":
            # a weighted mean: sum of weighted losses over the sum of weights, batch by batch
            w = loss_fn.weight.to(logits.device)[y]
            loss_sum += float((nn.functional.cross_entropy(logits, y, reduction="none") * w).sum())
            rows += float(w.sum())
        else:
            loss_sum += float(loss_fn(logits, y)) * len(y)
            rows += len(y)
    if rows == 0:
        return {}
    return {
        f"{prefix}_loss": loss_sum / rows,
        f"{prefix}_accuracy": accuracy(cm),
        f"{prefix}_f1_macro": f1_macro(cm),
    }


def record_resume(tracking: dict[str, str], state: dict[str, Any], start_epoch: int) -> None:
    """Log where training resumed; if the driver died between persisting the checkpoint and logging
    its epoch, log that epoch's metrics from the checkpoint so the history has no gap."""
    from kiln import tracking as trk

    uri, run_id = tracking["uri"], tracking["run_id"]
    logged = {m.step for m in trk.metric_history(uri, run_id, "epoch")}
    done = start_epoch - 1
    if done not in logged and state.get("metrics"):
        trk.log_metrics(
            uri, run_id, {k: v for k, v in state["metrics"].items() if k != "epoch"}, step=done
        )
        trk.log_metrics(uri, run_id, {"epoch": done}, step=done)
    trk.log_metrics(uri, run_id, {"resumed_at_epoch": start_epoch}, step=start_epoch)


def rebalance(
    y: torch.Tensor, train_counts: np.ndarray, sampler: str, generator: torch.Generator
) -> torch.Tensor:
    """Row indices of one batch after rebalancing (the streamed form of ``train.sampler``).

    ``oversample`` redraws the batch, same size, with replacement, each row weighted by the inverse
    of its class's train count (a balanced batch in expectation); ``undersample`` keeps each row
    with probability smallest class count / its class count (at least one row is kept). ``none``
    keeps the batch as it is. Draws come from ``generator``, seeded by epoch, rank and step.
    """
    if sampler == "none" or len(y) == 0:
        return torch.arange(len(y))
    counts = torch.as_tensor(np.maximum(train_counts, 1), dtype=torch.float64)
    per_row = counts[y.cpu()]
    if sampler == "oversample":
        return torch.multinomial(1.0 / per_row, len(y), replacement=True, generator=generator)
    present = counts[torch.as_tensor(train_counts) > 0]
    keep = torch.rand(len(y), generator=generator, dtype=torch.float64) < present.min() / per_row
    if not keep.any():
        keep[torch.randint(len(y), (1,), generator=generator)] = True
    return torch.nonzero(keep).flatten()


def record_worker_nodes(session: Session, tracking: dict[str, str] | None) -> None:
    """Tag the run with the node each rank runs on (``kiln.worker_nodes``), so placement on a
    cluster is visible.

    Every rank takes part (the node list is gathered collectively); rank 0 writes the tag.
    """
    nodes = session.worker_nodes()
    if nodes and session.rank == 0 and tracking:
        import json

        from kiln import tracking as trk

        trk.set_tags(tracking["uri"], tracking["run_id"], {trk.TAG_WORKER_NODES: json.dumps(nodes)})


def train_epochs(
    cfg: TrainingJobConfig,
    data: PreparedData,
    session: Session,
    tracking: dict[str, str] | None = None,
    resume_from: Path | None = None,
    hooks: LoopHooks | None = None,
    datasets: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train ``cfg.train.epochs`` epochs (continuing after the latest checkpoint). Returns reported
    metrics.

    ``datasets`` maps 'train' and 'val' to what batches are drawn from: Ray Data datasets, or a
    Ray Train worker's shards; by default the splits of ``data``, opened here (cached in the object
    store when small, see ``open_splits``)."""
    t = cfg.train
    hooks = hooks or LoopHooks()
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    keep_freed_memory()
    seed_everything(t.seed)
    spec = hooks.spec or model_spec(cfg, data)
    # the architecture its own config chose is allowed (an artifact's is checked against the list)
    model = hooks.build_model() if hooks.build_model else build_model(spec, [cfg.model.name])
    device = session.device(t.use_gpu)
    model = session.prepare_model(model.to(device))
    record_worker_nodes(session, tracking)

    if datasets is None:
        datasets = open_splits(data, ("train", "val"), t.data.cache, t.epochs)
    train_rows = data.sizes()["train"]
    row_bytes = 4 * math.prod(data.input_shape)
    weights = (
        torch.from_numpy(data.class_weights()).to(device) if t.class_weights == "auto" else None
    )
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    eval_loss = nn.CrossEntropyLoss(weight=weights.cpu() if weights is not None else None)

    local_batch = max(1, t.batch_size // session.world_size)
    # Validation steps on a CPU are the training steps' size: on a small CNN one step of 1024 rows
    # took 2.7x the time of 8 steps of 128 (its activations leave the cache; 0.20 s against
    # 0.075 s for 750 MNIST rows, every epoch). Rows still come from Ray Data in chunks of at
    # least FETCH_BYTES. A GPU keeps steps of at least EVAL_BATCH rows.
    eval_step = local_batch if device.type == "cpu" else max(local_batch, EVAL_BATCH)
    eval_fetch = max(eval_step, FETCH_BYTES // max(row_bytes, 1))
    steps_per_epoch = max(1, math.ceil(train_rows // session.world_size / local_batch))
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch)

    start_epoch = 0
    candidates = [c for c in (session.latest_checkpoint(), resume_from) if c is not None]
    if candidates:
        latest = max(candidates, key=lambda c: (read_state(c) or {"epoch": -1})["epoch"])
        start_epoch = load_checkpoint(latest, model, optimizer, scheduler) + 1
        if session.rank == 0 and tracking:
            record_resume(tracking, read_state(latest) or {}, start_epoch)

    reports = []
    every = cfg.train.checkpoint.every
    train_counts = data.class_counts[0]
    # small splits are streamed from Ray Data once per run, then drawn from memory (HeldRows)
    held_train, held_val = HeldRows(), HeldRows()
    for epoch in range(start_epoch, t.epochs):
        started = time.perf_counter()
        model.train()
        # Same seeds on resume: an epoch restarts from its first batch with the same shuffle,
        # dropout and rebalancing draws.
        epoch_seed = t.seed * 1_000_003 + epoch * 1009 + session.rank
        torch.manual_seed(epoch_seed)  # dropout
        draws = torch.Generator().manual_seed(epoch_seed)
        shuffle = torch.Generator().manual_seed(epoch_seed + 7)
        total, count = 0.0, 0
        later = epoch + 1 < t.epochs  # nothing is kept for an epoch that will not come
        batches = train_batches(
            datasets["train"], local_batch, t.data, row_bytes, shuffle, held_train.kept(later)
        )
        for batch in batches:
            xb, yb = batch["x"], batch["y"]
            if t.sampler != "none":  # rebalancing copies the batch; without it, no copy
                keep = rebalance(yb, train_counts, t.sampler, draws)
                xb, yb = xb[keep], yb[keep]
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = hooks.loss(logits, xb, yb, loss_fn) if hooks.loss else loss_fn(logits, yb)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += float(loss.detach()) * len(yb)
            count += len(yb)
        train_seconds = time.perf_counter() - started
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": session.all_reduce_mean(total / max(count, 1)),
            "lr": optimizer.param_groups[0]["lr"],
            "samples_per_s": session.all_reduce_mean(count / train_seconds) * session.world_size,
        }
        checkpoint_dir = None
        tmp = None
        if session.rank == 0:
            # Evaluate the plain module on rank 0 only: no collectives, so the other ranks don't
            # wait on it.
            if data.sizes()["val"]:
                metrics.update(
                    stream_metrics(
                        unwrap(model).cpu() if device.type == "cpu" else unwrap(model),
                        datasets["val"],
                        data.num_classes,
                        eval_loss,
                        "val",
                        device,
                        batch_size=eval_step,
                        held=held_val.kept(later),
                        fetch_rows=eval_fetch,
                    )
                )
            if (epoch + 1) % every == 0 or epoch + 1 == t.epochs:
                tmp = tempfile.TemporaryDirectory(prefix="kiln-ckpt-")
                checkpoint_dir = save_checkpoint(
                    Path(tmp.name) / checkpoint_name(epoch),
                    model,
                    optimizer,
                    scheduler,
                    epoch,
                    metrics,
                    spec,
                )
        session.report(metrics, checkpoint_dir)
        if tmp is not None:
            tmp.cleanup()
        if session.rank == 0 and tracking:
            from kiln import tracking as trk

            # one batch (one transaction, one request): the epoch and its metrics land together
            trk.log_metrics(tracking["uri"], tracking["run_id"], metrics, step=epoch)
        reports.append(metrics)
    return reports


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: ``loop_config`` holds the config dict, the prepared data's plan and
    samples (an ObjectRef, small: no rows beyond the bounded samples) and tracking info; the rows
    come from this worker's shard of the trainer's 'train' dataset and the whole 'val' dataset."""
    import ray
    import ray.train

    from kiln.train.session import RayTrainSession

    cfg = TrainingJobConfig.model_validate(loop_config["config"])
    data = loop_config["data"]
    if isinstance(data, ray.ObjectRef):
        data = ray.get(data)
    resume_from = loop_config.get("resume_from")
    train_epochs(
        cfg,
        data,
        RayTrainSession(),
        loop_config.get("tracking"),
        Path(resume_from) if resume_from else None,
        loop_config.get("hooks"),
        {name: ray.train.get_dataset_shard(name) for name in ("train", "val")},
    )
