"""The sweep's folder: ``<run_dir>/sweeps/<name>-<timestamp>/`` with its state, Ray Tune's
experiment (``tune/``), the early-stop record, ``best.yaml``, plots and ``results.json``.

``sweep.json`` holds what a resume needs: the MLflow parent run, the config, the status and the
driver's pid (so that a second driver does not resume a sweep that is still running).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError, KilnError
from kiln.files import atomic_write_json

STATE_FILE = "sweep.json"
RUNNING, INTERRUPTED, FINISHED, FAILED = "running", "interrupted", "finished", "failed"


@dataclass
class SweepFolder:
    path: Path
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def tune_dir(self) -> Path:
        return self.path / "tune"

    @property
    def name(self) -> str:
        return self.path.name

    def save(self, **updates: Any) -> None:
        self.state.update(updates)
        atomic_write_json(self.path / STATE_FILE, self.state, indent=2, sort_keys=True)


def sweeps_root(cfg) -> Path:
    return Path(cfg.experiment.run_dir).expanduser().resolve() / "sweeps"


def sweep_name(cfg) -> str:
    return cfg.require_tune().name or cfg.experiment.name


def create_sweep_folder(cfg) -> SweepFolder:
    """A new, empty folder ``<name>-<YYYYmmdd-HHMMSS>`` (a suffix when two start in one second)."""
    root = sweeps_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    stem = f"{sweep_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"
    for i in range(1000):
        path = root / (stem if i == 0 else f"{stem}-{i}")
        try:
            path.mkdir()
            return SweepFolder(path)
        except FileExistsError:
            continue
    raise KilnError(f"cannot create a sweep folder under {root}")


def _driver_alive(state: dict[str, Any]) -> bool:
    pid = state.get("driver_pid")
    if not pid or state.get("driver_host") != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"tune" in cmdline


def stored_num_samples(state: dict[str, Any]) -> int:
    """``tune.num_samples`` of the config a sweep's folder records (its size after any growth)."""
    return int(((state.get("config") or {}).get("tune") or {}).get("num_samples") or 0)


def latest_sweep_folder(cfg) -> SweepFolder:
    """The newest sweep of this name, to resume: an unfinished one, or a finished one that
    ``cfg`` grows (a larger ``tune.num_samples``). Raises KilnError when there is none to
    resume."""
    root = sweeps_root(cfg)
    name = sweep_name(cfg)
    pattern = re.compile(re.escape(name) + r"-(\d{8}-\d{6})(?:-(\d+))?")

    def order(path: Path) -> tuple[str, int]:
        match = pattern.fullmatch(path.name)
        return (match.group(1), int(match.group(2) or 0)) if match else ("", 0)

    candidates = sorted(
        (
            p
            for p in root.glob(f"{name}-*")
            if pattern.fullmatch(p.name) and (p / STATE_FILE).is_file()
        ),
        key=order,
    )
    if not candidates:
        raise KilnError(f"--resume: no sweep named '{name}' under {root} to resume")
    path = candidates[-1]
    state = json.loads((path / STATE_FILE).read_text())
    stored = stored_num_samples(state)
    if state.get("status") == FINISHED and not (stored and cfg.require_tune().num_samples > stored):
        raise KilnError(
            f"--resume: the latest sweep '{name}' ({path}) already finished; run without --resume "
            f"to start a new one, or raise tune.num_samples above {stored} to add trials to it"
        )
    if _driver_alive(state):
        raise KilnError(
            f"--resume: sweep {path} is still running (driver pid {state['driver_pid']})"
        )
    return SweepFolder(path, state)


def check_same_config(folder: SweepFolder, config: dict[str, Any]) -> None:
    """Raise ConfigError when ``config`` differs from the one the sweep started with (a larger
    ``tune.num_samples`` grows the sweep and is allowed)."""
    from kiln.tracking import flatten

    stored = folder.state.get("config") or {}
    old, new = flatten(stored), flatten(config)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff == ["tune.num_samples"] and new[diff[0]] > old.get(diff[0], 0):
        return
    if diff:
        raise ConfigError(
            f"--resume: the config differs from sweep {folder.path}'s at {', '.join(diff)}"
        )


def mark_driver(folder: SweepFolder, **updates: Any) -> None:
    folder.save(driver_pid=os.getpid(), driver_host=socket.gethostname(), **updates)
