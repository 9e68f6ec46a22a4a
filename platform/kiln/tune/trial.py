"""One trial of a sweep: the Ray Tune function trainable around the one training loop.

With one worker a trial runs ``train_epochs`` in its own process through ``TuneSession`` (no Ray
Train start-up per trial). With ``trial_workers`` > 1 on CPUs, that process is rank 0 of a DDP
group whose other ranks are Ray actors it starts (``kiln.tune.ranks``); on GPUs a trial runs a Ray
Train TorchTrainer whose reports reach Tune through ``TrialReportCallback``. A trial does not talk
to MLflow: the driver logs what trials report (``kiln.tune.runs``), so trial processes never import
it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.train.session import LocalCopy, process_group_mean, single_process_device
from kiln.tune.config import TuneJobConfig
from kiln.tune.space import Dimension, apply_params, decode_params

TIME_ATTR = "epochs_done"  # what ASHA counts: finished epochs, the same after a restore


@dataclass
class TrialContext:
    """What every trial needs besides its sampled values (shipped once through the object store)."""

    base_config: dict[str, Any]  # the train config of a trial before its sampled values are applied
    schema: type[TuneJobConfig]  # the whole config's class, that validates a trial's config
    dims: list[Dimension]
    sweep_name: str  # names the Ray Train runs of multi-worker trials (stable across a resume)
    measures: tuple[str, ...] = ()  # model measures an objective needs, besides "params"
    data_config: dict[str, Any] = field(
        default_factory=dict
    )  # the data config the shipped data was prepared for


def trial_number(experiment_tag: str) -> int:
    """Ray Tune's experiment tag starts with the trial's sequence number ("3_train.lr=...")."""
    head = str(experiment_tag).split("_", 1)[0]
    return int(head) if head.isdigit() else 0


def trial_dirname(trial) -> str:
    """Trial folders sort in the order the trials were created."""
    return f"trial_{trial_number(trial.experiment_tag):04d}_{trial.trial_id}"


def trial_name(trial) -> str:
    return f"trial_{trial_number(trial.experiment_tag):04d}"


class TuneSession:
    """The loop's Session inside a Tune trial: reports and checkpoints go to ``ray.tune.report``.

    Rank 0 of ``world_size`` ranks (``kiln.tune.ranks``): the model is wrapped in DDP and metrics
    averaged over the trial's process group when there are more. When Tune ends the trial (ASHA,
    or its last epoch), ``ray.tune.report`` does not return.
    """

    rank = 0

    def __init__(self, extras: dict[str, float], world_size: int = 1):
        import ray.tune

        self.extras = extras
        self.world_size = world_size
        self._local = LocalCopy(ray.tune.get_checkpoint())
        self._mark = time.perf_counter()

    def device(self, use_gpu: bool):
        return single_process_device(use_gpu)

    def prepare_model(self, model):
        from kiln.tune.ranks import data_parallel

        model = data_parallel(model, self.world_size)
        self._mark = time.perf_counter()
        return model

    def restored_checkpoint(self):
        """The ray.tune.Checkpoint the trial resumes from (None on a first attempt)."""
        return self._local.checkpoint

    def latest_checkpoint(self) -> Path | None:
        return self._local.path()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.tune

        epoch = int(metrics["epoch"])
        row = {
            **metrics,
            **self.extras,
            TIME_ATTR: epoch + 1,
            "epoch_seconds": time.perf_counter() - self._mark,
            "reported_at": time.time(),
        }
        checkpoint = (
            ray.tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        )
        ray.tune.report(row, checkpoint=checkpoint)  # persists the checkpoint before it returns
        self._mark = time.perf_counter()

    def all_reduce_mean(self, value: float) -> float:
        return process_group_mean(value, self.world_size)

    def worker_nodes(self) -> list[dict[str, Any]]:
        """A trial logs no run of its own: nothing to record (and no collective to join)."""
        return []


def _trial_report_callback(extras: dict[str, float]):
    """Tune's TuneReportCallback for a Ray Train run inside a trial, adding the trial's model
    measures."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class TrialReportCallback(TuneReportCallback):
        def __init__(self, extras: dict[str, float]):
            super().__init__()
            self.extras = extras

        def after_report(self, run_context, metrics, checkpoint):
            rows = [dict(m) for m in metrics]
            rows[0].update(self.extras)
            rows[0][TIME_ATTR] = int(rows[0]["epoch"]) + 1
            rows[0]["reported_at"] = time.time()
            super().after_report(run_context, rows, checkpoint)

    return TrialReportCallback(extras)


def model_measures(cfg, data, measures: tuple[str, ...]) -> dict[str, float]:
    """Parameter count and, when asked for, median batch-1 latency (ms) of the trial's architecture.

    Latency is measured once, on fresh weights: it depends on the architecture, not on the values.
    """
    import torch

    from kiln.models.artifact import build_model
    from kiln.models.builders import count_parameters
    from kiln.train.loop import model_spec

    model = build_model(model_spec(cfg, data), [cfg.model.name]).eval()
    out = {"params": float(count_parameters(model))}
    if "latency_ms" in measures:
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
        x = torch.from_numpy(data.x_val[:1] if len(data.x_val) else data.x_train[:1])
        times = []
        with torch.inference_mode():
            for i in range(60):
                start = time.perf_counter()
                model(x)
                if i >= 10:  # warm-up first
                    times.append(time.perf_counter() - start)
        times.sort()
        out["latency_ms"] = 1000.0 * times[len(times) // 2]
    return out


def run_trial(params: dict[str, Any], ctx: TrialContext, data=None, datasets=None) -> None:
    """The Tune trainable: train one sampled config, reporting every epoch (with a checkpoint) to
    Tune."""
    import ray.tune

    from kiln.config import validate_config
    from kiln.data.dataset import prepare_data
    from kiln.train.checkpoint import read_state
    from kiln.train.loop import train_epochs

    values = decode_params(ctx.dims, params)
    cfg = validate_config(apply_params(ctx.base_config, values), ctx.schema)
    if data is None or cfg.data.model_dump(mode="json") != ctx.data_config:
        data = prepare_data(cfg.data)  # the sampled values change the data itself
        datasets = None  # opened from the trial's own data
    extras = model_measures(cfg, data, ctx.measures)

    if not cfg.train.use_gpu:
        session = TuneSession(extras, world_size=cfg.train.workers)
        restored = session.latest_checkpoint()
        state = read_state(restored) if restored else None
        if state and int(state["epoch"]) + 1 >= cfg.train.epochs:
            # Finished before the driver died but not yet recorded as finished: report, don't
            # retrain.
            session.report(state["metrics"], None)
            return
        if cfg.train.workers == 1:
            train_epochs(cfg, data, session, datasets=datasets)
            return
        from kiln.data.dataset import open_splits
        from kiln.tune.ranks import run_ranked_trial

        if datasets is None:
            datasets = open_splits(data, ("train", "val"), cfg.train.data.cache, cfg.train.epochs)
        run_ranked_trial(cfg, data, datasets, session)
        return

    from kiln.train.run import fit_on_ray

    # Named by trial: a resumed trial's Ray Train run continues from its own checkpoints.
    name = f"{ctx.sweep_name}-{ray.tune.get_context().get_trial_id()}"
    result = fit_on_ray(
        cfg, data, None, name, callbacks=[_trial_report_callback(extras)], datasets=datasets
    )
    if result.error is not None:
        raise result.error
