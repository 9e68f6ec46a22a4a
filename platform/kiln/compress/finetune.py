"""Training a variant as a Ray Train job through the one training loop (``fit_on_ray`` +
``LoopHooks``).

Structured pruning fine-tunes the pruned network (``build_model`` starts from its weights);
distillation trains a fresh student with a distillation loss (``loss``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from kiln.compress.config import CompressJobConfig
from kiln.data.dataset import PreparedData
from kiln.errors import KilnError
from kiln.models.artifact import WEIGHTS_FILE, build_model, write_mlmodel
from kiln.models.spec import SPEC_FILE, ModelSpec


class StartFrom:
    """``LoopHooks.build_model``: the spec's architecture (resized per its structure) with given
    weights.

    Picklable (the weights travel as safetensors bytes), so Ray ships it to the workers.
    """

    def __init__(self, spec: ModelSpec, model: torch.nn.Module):
        from safetensors.torch import save

        from kiln.models.artifact import state_dict_tensors

        self.spec = spec.to_dict()
        self.weights = save(state_dict_tensors(model))

    def __call__(self) -> torch.nn.Module:
        from safetensors.torch import load

        model = build_model(ModelSpec.from_dict(self.spec))
        model.load_state_dict(load(self.weights))
        return model


def step_config(cfg: CompressJobConfig, epochs: int, lr: float | None) -> CompressJobConfig:
    """The run's config with the step's training budget."""
    step_cfg = cfg.model_copy(deep=True)
    step_cfg.train.epochs = epochs
    if lr is not None:
        step_cfg.train.lr = lr
    return step_cfg


def train_variant(
    cfg: CompressJobConfig,
    data: PreparedData,
    spec: ModelSpec,
    out_dir: Path,
    tracking_uri: str,
    run_id: str,
    start: StartFrom | None = None,
    loss=None,
    debug: bool = False,
) -> Path:
    """Train on Ray (``cfg.train`` sets workers and budget); write the best checkpoint's model to
    ``out_dir``.

    Raises KilnError when the job fails. The job's own checkpoints are removed afterwards: the
    variant lives on in ``out_dir`` (and then in MLflow).
    """
    from kiln.train.loop import LoopHooks
    from kiln.train.report import failure_line
    from kiln.train.run import best_checkpoint_path, fit_on_ray, storage_root

    hooks = LoopHooks(build_model=start, spec=spec, loss=loss)
    try:
        result = fit_on_ray(cfg, data, tracking_uri, run_id, debug, hooks=hooks)
        if result.error is not None:
            raise result.error
    except KilnError:
        raise
    except Exception as exc:
        raise KilnError(f"training a variant failed: {failure_line(exc)}") from exc
    best = Path(best_checkpoint_path(result, cfg))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (SPEC_FILE, WEIGHTS_FILE):
        shutil.copy2(best / name, out_dir / name)
    write_mlmodel(out_dir)
    job_dir = Path(storage_root(cfg)) / f"kiln-{run_id}"
    if job_dir.is_dir():
        shutil.rmtree(job_dir, ignore_errors=True)
    return out_dir
