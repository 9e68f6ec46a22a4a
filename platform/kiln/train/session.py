"""The small interface the training loop reports through, in-process or inside Ray Train workers."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol


class Session(Protocol):
    rank: int
    world_size: int

    def device(self, use_gpu: bool): ...

    def prepare_model(self, model): ...

    def latest_checkpoint(self) -> Path | None: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...

    def all_reduce_mean(self, value: float) -> float: ...

    def worker_nodes(self) -> list[dict[str, Any]]: ...


def single_process_device(use_gpu: bool):
    """The first GPU when asked for and present, else the CPU (sessions without DDP)."""
    import torch

    return torch.device("cuda:0" if use_gpu and torch.cuda.is_available() else "cpu")


def process_group_mean(value: float, world_size: int) -> float:
    """The mean of ``value`` over the ranks of this process's torch.distributed group (a
    collective: every rank calls it); ``value`` itself outside a group."""
    import torch
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item() / world_size)


class LocalCopy:
    """A Ray checkpoint (Ray Train's or Tune's) copied into a local temporary folder on first use,
    removed with this object: what a session's ``latest_checkpoint`` returns."""

    def __init__(self, checkpoint: Any):
        self.checkpoint = checkpoint
        self._tmp: tempfile.TemporaryDirectory | None = None

    def path(self) -> Path | None:
        if self.checkpoint is None:
            return None
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kiln-restore-")
            self.checkpoint.to_directory(self._tmp.name)
        return Path(self._tmp.name)


class LocalSession:
    """Single process, no Ray: checkpoints are copied into ``checkpoint_root``."""

    rank = 0
    world_size = 1

    def __init__(self, checkpoint_root: str | Path | None = None):
        self.root = Path(checkpoint_root or tempfile.mkdtemp(prefix="kiln-ckpt-"))
        self.reports: list[dict[str, Any]] = []
        self._latest: Path | None = None

    def device(self, use_gpu: bool):
        return single_process_device(use_gpu)

    def prepare_model(self, model):
        return model

    def latest_checkpoint(self) -> Path | None:
        return self._latest

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            dest = self.root / Path(checkpoint_dir).name
            shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)
            self._latest = dest

    def all_reduce_mean(self, value: float) -> float:
        return value

    def worker_nodes(self) -> list[dict[str, Any]]:
        """No Ray nodes in-process: nothing to record."""
        return []


class RayTrainSession:
    """Inside a Ray Train worker: DDP via prepare_model, checkpoints through ray.train.report."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self._restored = LocalCopy(ray.train.get_checkpoint())

    def device(self, use_gpu: bool):
        import ray.train.torch
        import torch

        return ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    def latest_checkpoint(self) -> Path | None:
        return self._restored.path()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = (
            ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        )
        name = Path(checkpoint_dir).name if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def all_reduce_mean(self, value: float) -> float:
        return process_group_mean(value, self.world_size)

    def worker_nodes(self) -> list[dict[str, Any]]:
        """Where every rank runs, by rank: ``[{"rank", "node_id", "node_ip"}, ...]`` (a collective:
        all ranks call it)."""
        import ray
        import torch.distributed as dist

        here = {
            "rank": self.rank,
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
        }
        if self.world_size == 1 or not dist.is_initialized():
            return [here]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, here)
        return sorted(gathered, key=lambda w: w["rank"])
