"""Training checkpoints: a folder with weights (safetensors), optimizer and scheduler state, epoch
and spec.

A checkpoint is also a loadable model artifact (it holds ``spec.json`` and ``model.safetensors``).
``state.json`` is written last, so a folder without it is an incomplete checkpoint.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import torch

from kiln.models.artifact import load_weights, save_weights, write_mlmodel
from kiln.models.spec import ModelSpec

STATE_FILE = "state.json"


def checkpoint_name(epoch: int) -> str:
    # Unique per report: after a worker restart an epoch may be reported again (at-least-once).
    return f"epoch_{epoch:04d}_{uuid.uuid4().hex[:6]}"


def save_checkpoint(
    directory: Path,
    model,
    optimizer,
    scheduler,
    epoch: int,
    metrics: dict[str, Any],
    spec: ModelSpec,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model, directory)
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    spec.save(directory)
    write_mlmodel(directory)
    (directory / STATE_FILE).write_text(json.dumps({"epoch": epoch, "metrics": metrics}))
    return directory


def read_state(directory: Path) -> dict[str, Any] | None:
    """The checkpoint's ``{epoch, metrics}``, or None for an incomplete folder."""
    try:
        return json.loads((Path(directory) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_checkpoint(directory: Path, model, optimizer, scheduler) -> int:
    """Restore states in place; returns the epoch the checkpoint finished. weights_only: no pickled
    code."""
    load_weights(model, directory)
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
    if scheduler is not None and (directory / "scheduler.pt").exists():
        scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
    state = read_state(directory)
    return int(state["epoch"]) if state else -1


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest epoch anywhere under ``root`` (a local or mounted
    path)."""
    best: tuple[int, Path] | None = None
    for state_file in Path(root).glob(f"**/{STATE_FILE}"):
        state = read_state(state_file.parent)
        if state is not None and (best is None or state["epoch"] > best[0]):
            best = (int(state["epoch"]), state_file.parent)
    return best[1] if best else None
