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
from enum import StrEnum
from pathlib import Path
from typing import Any

from kiln.errors import KilnError, first_line
from kiln.files import atomic_write_json


class Phase(StrEnum):
    """Where a model's rollout stands (str-valued: the record's JSON holds the plain names)."""

    IDLE = "idle"  # no rollout yet, or the record restarted from a version serving named
    PREPARING = "preparing"  # replicas load and smoke-check the candidate
    RUNNING = "running"
    PAUSED = "paused"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


ACTIVE = (Phase.PREPARING, Phase.RUNNING, Phase.PAUSED)  # a rollout in progress
FINISHED = (Phase.PROMOTED, Phase.ROLLED_BACK, Phase.ABORTED)


@dataclass
class RolloutRecord:
    """The state of a model's rollouts. ``stable`` answers by default; ``candidate`` is being rolled
    out."""

    model: str
    registered_name: str
    tracking_uri: str
    stable: str
    stable_uri: str
    phase: str = Phase.IDLE
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
    # version -> replica deaths with requests of it in flight, during this rollout (the restarts
    # gate signal; kept in the record so that a restarted controller goes on counting)
    restarts: dict[str, int] = field(default_factory=dict)

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


class RolloutRecordError(KilnError):
    """A rollout record exists but cannot be read (truncated, corrupted, unreadable)."""


class RolloutStore:
    """Reads and writes one model's record and audit log."""

    def __init__(self, run_dir: str | Path, model: str):
        self.dir = rollouts_dir(run_dir)
        self.model = model
        self.record_path = self.dir / f"{model}.json"
        self.audit_path = self.dir / f"{model}.audit.jsonl"

    def load(self) -> RolloutRecord | None:
        """The record, or None when there is none. Raises RolloutRecordError when there is one
        that cannot be read: ignoring it would silently drop a promotion or a rollback target."""
        if not self.record_path.is_file():
            return None
        try:
            data = json.loads(self.record_path.read_text())
            if not isinstance(data, dict):
                raise TypeError(f"a JSON {type(data).__name__}, not an object")
            return RolloutRecord.from_dict(data)
        except (OSError, ValueError, TypeError) as exc:  # ValueError: JSON, UTF-8
            raise RolloutRecordError(
                f"rollout record {self.record_path} is unreadable ({first_line(exc)}); restore it, "
                f"or move it aside to serve the configured versions (its history stays in "
                f"{self.audit_path.name})"
            ) from None

    def save(self, record: RolloutRecord) -> None:
        """Write the record atomically: a reader (or a restarted controller) never sees half of
        it."""
        atomic_write_json(self.record_path, record.to_dict())

    def audit(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append one entry (``time`` added when missing) and fsync it: the log is append-only, so
        a crash can cut only its last line short (``history`` skips such a line). Returns it."""
        entry = {"time": time.time(), **entry}
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.audit_path, "a") as f:
            f.write(json.dumps(entry, separators=(",", ":"), default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return entry

    def history(self) -> list[dict[str, Any]]:
        """The audit log's entries, oldest first."""
        if not self.audit_path.is_file():
            return []
        entries = []
        for line in self.audit_path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash mid-write
                continue
        return entries
