"""Requests in flight per version in a replica, kept where they outlive the replica's process.

A replica counts each request it is answering in a small memory-mapped file under the run dir
(``RUN_DIR/serve/rollouts/inflight/MODEL/REPLICA.bin``): a counter per version, written in memory
(no system call on the request path). When the replica's process dies (killed, out of memory, a
runtime's abort), the kernel still holds the counts of that instant, and the model's rollout
controller reads them: the requests each version lost with the replica, which clients saw fail (or
retried) outside any replica. The controller counts them as that version's errors and removes the
file. On a multi-node cluster this needs the run dir shared with the head node, like the record.

Layout: a header (magic, pid), then ``SLOTS`` slots of (version name, signed 64-bit count).
"""

from __future__ import annotations

import mmap
import os
import shutil
import struct
from pathlib import Path

from kiln.rollout.core.store import rollouts_dir

MAGIC = b"KILNINF1"
HEADER = struct.Struct("<8sq")  # magic, pid
NAME_BYTES = 56
SLOT = struct.Struct(f"<{NAME_BYTES}sq")  # version (UTF-8, NUL-padded), requests in flight
COUNT = struct.Struct("<q")
SLOTS = 32  # versions a replica can count (a replica serves a handful)
SIZE = HEADER.size + SLOTS * SLOT.size


def journals_dir(run_dir: str | Path) -> Path:
    """The folder of every model's in-flight files under ``run_dir``."""
    return rollouts_dir(run_dir) / "inflight"


def journal_path(run_dir: str | Path, model: str, replica: str) -> Path:
    """Where the replica ``replica`` (its Ray actor id) of ``model`` keeps its counts."""
    return journals_dir(run_dir) / model / f"{replica}.bin"


def forget_journals(run_dir: str | Path) -> None:
    """Remove every in-flight file of ``run_dir``: serving from it was stopped on purpose (``kiln
    serve stop``), so what a replica held then is no loss for a later controller to count. The
    replicas of a stopped local instance die with it and never remove their own: the next
    ``kiln serve start`` reported each one as a replica death, with nothing in flight."""
    shutil.rmtree(journals_dir(run_dir), ignore_errors=True)


class InflightJournal:
    """One replica's counts of requests in flight per version (single-threaded: the replica's
    event loop)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, SIZE)
            self._map = mmap.mmap(fd, SIZE)  # MAP_SHARED: the page cache outlives the process
        finally:
            os.close(fd)
        self.path = path
        HEADER.pack_into(self._map, 0, MAGIC, os.getpid())
        self._slots: dict[str, int] = {}  # version -> offset of its count
        self._counts: dict[str, int] = {}

    def begin(self, version: str) -> None:
        """A request of ``version`` starts."""
        self._add(version, 1)

    def end(self, version: str) -> None:
        """A request of ``version`` has its answer (or failed inside the replica)."""
        self._add(version, -1)

    def _add(self, version: str, delta: int) -> None:
        offset = self._slots.get(version)
        if offset is None:
            if len(self._slots) >= SLOTS:
                return  # more versions than slots: the extra ones go uncounted
            start = HEADER.size + len(self._slots) * SLOT.size
            SLOT.pack_into(self._map, start, version.encode()[:NAME_BYTES], 0)
            offset = self._slots[version] = start + NAME_BYTES
        count = self._counts.get(version, 0) + delta
        self._counts[version] = count
        COUNT.pack_into(self._map, offset, count)  # one aligned 8-byte store

    def close(self) -> None:
        """Remove the file (a replica stopping cleanly has nothing in flight)."""
        self._map.close()
        self.path.unlink(missing_ok=True)


def read_journal(path: Path) -> dict[str, int]:
    """The counts a replica left in ``path``: version -> requests in flight (those above 0); {}
    for a missing or foreign file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    if len(data) < SIZE or HEADER.unpack_from(data, 0)[0] != MAGIC:
        return {}
    counts = {}
    for slot in range(SLOTS):
        name, count = SLOT.unpack_from(data, HEADER.size + slot * SLOT.size)
        version = name.rstrip(b"\0").decode(errors="replace")
        if version and count > 0:
            counts[version] = count
    return counts
