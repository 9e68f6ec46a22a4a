"""Durable file writes: a reader (or a process restarted after a crash) sees the old file or the new
one, never half of one, and a written file survives a power loss once the call returns."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically: write a temporary file beside it, fsync, rename, fsync
    the folder.

    ``mode`` sets the file's permission bits before it becomes visible (for example 0o600 for a
    secret). Returns the path. Raises OSError when the folder cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> Path:
    """``atomic_write_bytes`` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(
    path: str | Path, data: Any, indent: int | None = 2, sort_keys: bool = False
) -> Path:
    """``atomic_write_bytes`` of ``data`` as JSON (strict: NaN and infinities are refused with
    ValueError)."""
    return atomic_write_text(
        path, json.dumps(data, indent=indent, sort_keys=sort_keys, allow_nan=False)
    )


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk; some filesystems refuse a
    # directory fsync (EINVAL), where the rename is all we can do.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
