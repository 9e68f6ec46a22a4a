"""A model's rollout record and audit log, kept outside any replica or actor.

Files, under ``RUN_DIR/serve/rollouts/``: ``MODEL.json`` (the record: the stable version, the
rollout in progress or last finished, written atomically) and ``MODEL.audit.jsonl`` (one JSON object
per gate evaluation and per decision: time, step, weights, gate values, decision, trigger, reason).
The controller actor is their only writer while it runs; it reloads the record when it (re)starts,
and ``kiln serve start`` reads it to come back on the last promoted version. On a multi-node cluster
the run dir must be a path the head node shares (the controller runs there).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ACTIVE = ("preparing", "running", "paused")  # a rollout in progress
FINISHED = ("promoted", "rolled_back", "aborted")


@dataclass
class RolloutRecord:
    """The state of a model's rollouts. ``stable`` answers by default; ``candidate`` is being rolled
    out."""

    model: str
    registered_name: str
    tracking_uri: str
    stable: str
    stable_uri: str
    phase: str = "idle"  # idle | preparing | running | paused | promoted | rolled_back | aborted
    candidate: str | None = None
    candidate_uri: str | None = None
    strategy: str | None = None
    steps: list[float] = field(default_factory=list)  # candidate share per step (percent)
    shadow: float = 0.0  # share mirrored to the candidate (shadow strategy)
    bake_s: float = 0.0
    interval_s: float = 5.0
    gates: list[str] = field(default_factory=list)
    sticky_header: str | None = None
    step: int = -1  # index into steps; -1 while preparing
    weight: float = 0.0  # the candidate's share now
    step_started_at: float = 0.0
    baked_s: float = (
        0.0  # time the current step has run with every gate passing (holds do not count)
    )
    started_at: float = 0.0
    finished_at: float | None = None
    trigger: str = "user"  # who started it: user | gate | auto | monitor | ...
    reason: str = ""  # why it ended (or paused)
    previous: str | None = None  # the stable version before the last promotion (for rollback)
    previous_uri: str | None = None
    revision: int = 0

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def rollouts_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).expanduser().resolve() / "serve" / "rollouts"


class RolloutStore:
    """Reads and writes one model's record and audit log."""

    def __init__(self, run_dir: str | Path, model: str):
        self.dir = rollouts_dir(run_dir)
        self.model = model
        self.record_path = self.dir / f"{model}.json"
        self.audit_path = self.dir / f"{model}.audit.jsonl"

    def load(self) -> RolloutRecord | None:
        if not self.record_path.is_file():
            return None
        try:
            return RolloutRecord.from_dict(json.loads(self.record_path.read_text()))
        except (json.JSONDecodeError, TypeError):
            return None

    def save(self, record: RolloutRecord) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.record_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record.to_dict(), indent=2))
        tmp.replace(
            self.record_path
        )  # atomic: a reader (or a restarted controller) never sees half a file

    def audit(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append one entry (``time`` added when missing); returns it."""
        entry = {"time": time.time(), **entry}
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.audit_path, "a") as f:
            f.write(json.dumps(entry, separators=(",", ":"), default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return entry

    def history(self) -> list[dict[str, Any]]:
        if not self.audit_path.is_file():
            return []
        entries = []
        for line in self.audit_path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash mid-write
                continue
        return entries
