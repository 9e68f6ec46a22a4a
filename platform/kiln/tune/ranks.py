"""A multi-worker CPU trial without Ray Train: the trial's own process is rank 0, and N-1 Ray actors
placed in the trial's placement group are the other ranks of one gloo process group (DDP).

Why not a TorchTrainer per trial: each ``fit()`` starts about 8 processes (its controller, four
helper actors, the workers, a split coordinator), about 27 core-seconds before the first step on a
2-core machine (BENCHMARKS.md, per-trial overhead), and a sweep pays that for every trial. Here a
trial starts only its N-1 peer actors. What Ray Train did for a trial is done here instead: the
ranks hold the trial's resources (Tune's placement group, one bundle per rank), the train split is
sharded equally between them by Ray Data, every rank resumes from the trial's checkpoint, and a rank
that fails or dies fails the trial, which Tune restarts from its last checkpoint
(``tune.trial_max_failures``). GPU trials still run on Ray Train (its device placement and NCCL).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.train.config import TrainingJobConfig
from kiln.train.session import LocalCopy, process_group_mean

# A peer that has not joined after this long (placement, process start, imports) fails the trial.
JOIN_TIMEOUT_S = 600.0
# How long a rank waits in a collective for the others: rank 0 validates, checkpoints and reports
# while its peers wait at the next step (Ray Train's default for its process group too).
COLLECTIVE_TIMEOUT_S = 1800.0
PEER_EXIT_TIMEOUT_S = 10.0  # a finished peer's graceful exit; after it, it is killed
_READY_KEY = "kiln/ready/{rank}"


def shard(dataset: Any, ranks: int) -> list[Any]:
    """The train split in ``ranks`` streamed shards of equal rows (Ray Data's streaming split, as
    Ray Train's). Not ``Dataset.split``: its tasks take a whole CPU each, and a sweep's trials hold
    every CPU, so they would never run; the split coordinator and Kiln's read tasks reserve none."""
    return list(dataset.streaming_split(ranks, equal=True))


def data_parallel(model: Any, world_size: int) -> Any:
    """``model`` wrapped in DDP when there is more than one rank (CPU, gloo)."""
    if world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


@dataclass
class RankJob:
    """What a peer rank needs: the trial's config and data, its shard, and where rank 0 listens."""

    config: dict[str, Any]  # the trial's validated train config, as a dict
    schema: type[TrainingJobConfig]  # the config class that validates it
    data: Any  # the PreparedData (an ObjectRef: plan and bounded samples, no rows)
    train: Any  # this rank's shard of the train split
    val: Any  # the validation split (rank 0 alone reads it)
    rank: int
    world_size: int
    host: str
    port: int
    checkpoint: Any  # the ray.tune.Checkpoint the trial resumes from, or None


class PeerSession:
    """The loop's Session on a peer rank (> 0): DDP over the trial's process group; rank 0
    reports."""

    def __init__(self, rank: int, world_size: int, checkpoint: Any):
        self.rank, self.world_size = rank, world_size
        self._restored = LocalCopy(checkpoint)

    def device(self, use_gpu: bool):
        import torch

        return torch.device("cpu")

    def prepare_model(self, model):
        return data_parallel(model, self.world_size)

    def latest_checkpoint(self) -> Path | None:
        return self._restored.path()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Rank 0 reports for the trial; a peer's metrics were already averaged into rank 0's."""

    def all_reduce_mean(self, value: float) -> float:
        return process_group_mean(value, self.world_size)

    def worker_nodes(self) -> list[dict[str, Any]]:
        """A trial logs no run of its own: nothing to record (and no collective to join)."""
        return []


class TrialPeer:
    """A peer rank of a trial (a Ray actor, started by ``run_ranked_trial``)."""

    def train(self, job: RankJob) -> None:
        import ray
        import torch.distributed as dist

        from kiln.config import validate_config
        from kiln.train.loop import train_epochs

        store = dist.TCPStore(
            job.host,
            job.port,
            job.world_size,
            is_master=False,
            timeout=timedelta(seconds=JOIN_TIMEOUT_S),
        )
        cfg = validate_config(job.config, job.schema)
        data = ray.get(job.data) if isinstance(job.data, ray.ObjectRef) else job.data
        store.set(_READY_KEY.format(rank=job.rank), "1")
        dist.init_process_group(
            "gloo",
            store=store,
            rank=job.rank,
            world_size=job.world_size,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        try:
            session = PeerSession(job.rank, job.world_size, job.checkpoint)
            train_epochs(cfg, data, session, datasets={"train": job.train, "val": job.val})
        finally:
            # Closes this rank's connections: a rank 0 waiting in a collective fails at once
            # instead of waiting out COLLECTIVE_TIMEOUT_S.
            dist.destroy_process_group()


def run_ranked_trial(
    cfg: TrainingJobConfig, data: Any, datasets: dict[str, Any], session: Any
) -> None:
    """Train ``cfg`` on ``cfg.train.workers`` ranks: this process is rank 0 (``session``, a
    TuneSession of that world size, reports to Tune); the peers are started here and ended when
    the trial ends, however it ends (finished, stopped by the scheduler, failed)."""
    import ray
    import torch.distributed as dist

    from kiln.train.loop import train_epochs

    n = cfg.train.workers
    host = ray.util.get_node_ip_address()
    store = dist.TCPStore(
        host,
        0,
        n,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=JOIN_TIMEOUT_S),
    )
    shards = shard(datasets["train"], n)
    data_ref = ray.put(data)
    checkpoint = session.restored_checkpoint()
    peers: list[Any] = []
    done: list[Any] = []
    try:
        for rank in range(1, n):
            peer: Any = ray.remote(TrialPeer).options(**_peer_options(cfg, rank)).remote()
            peers.append(peer)
            job = RankJob(
                cfg.to_dict(),
                type(cfg),
                data_ref,
                shards[rank],
                datasets["val"],
                rank,
                n,
                host,
                store.port,
                checkpoint,
            )
            done.append(peer.train.remote(job))
        _wait_for_peers(store, done, n)
        dist.init_process_group(
            "gloo",
            store=store,
            rank=0,
            world_size=n,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        try:
            train_epochs(cfg, data, session, datasets={"train": shards[0], "val": datasets["val"]})
        except RuntimeError as exc:  # gloo's, when a peer left the group: its own error says why
            cause = _peer_failure(done)
            if cause is None:
                raise
            raise cause from exc
        ray.get(done)
        # Finished peers exit on their own (Ray's graceful actor exit: what they record, such as
        # their task's end, is flushed first); the kill below is for the other ways a trial ends.
        exits = [peer.__ray_terminate__.remote() for peer in peers]
        exited, _ = ray.wait(exits, num_returns=len(exits), timeout=PEER_EXIT_TIMEOUT_S)
        peers = [peer for peer, ref in zip(peers, exits, strict=True) if ref not in exited]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for peer in peers:
            ray.kill(peer)


def _peer_options(cfg: TrainingJobConfig, rank: int) -> dict[str, Any]:
    """A peer takes bundle ``rank`` of the trial's placement group (bundle 0 is the trial's own)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    options: dict[str, Any] = {"num_cpus": cfg.train.cpus_per_worker, "max_restarts": 0}
    group = ray.util.get_current_placement_group()
    if group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=rank
        )
    return options


def _wait_for_peers(store: Any, done: list[Any], world_size: int) -> None:
    """Until every peer has joined: a peer that failed first (its task ended) fails the trial with
    its own error, one that never comes fails it after JOIN_TIMEOUT_S."""
    import ray

    keys = [_READY_KEY.format(rank=r) for r in range(1, world_size)]
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while True:
        try:
            store.wait(keys, timedelta(seconds=1))
            return
        except RuntimeError:  # TCPStore.wait's timeout (DistStoreError is a RuntimeError)
            pass
        finished, _ = ray.wait(done, num_returns=1, timeout=0)
        if finished:
            ray.get(finished)  # raises the peer's error
        if time.monotonic() > deadline:
            raise KilnError(f"a trial's peer ranks did not join within {JOIN_TIMEOUT_S:.0f} s")


def _peer_failure(done: list[Any]) -> BaseException | None:
    """The error of a peer that ended (its exception, or its death), if one did within a few
    seconds of rank 0's collective failing."""
    import ray

    finished, _ = ray.wait(done, num_returns=1, timeout=5)
    for ref in finished:
        try:
            ray.get(ref)
        except Exception as exc:  # the peer's own failure, whatever it was
            return exc
    return None
