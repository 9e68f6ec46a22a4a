"""Reading and writing Parquet with pyarrow (a file, or a folder of files read as one dataset)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kiln.data.builtin import BUILTIN_SOURCES, load_builtin
from kiln.errors import DataError, first_line


def read_source(source: str) -> pa.Table:
    """Read ``data.source``: a built-in name or a Parquet file/folder. Raises DataError."""
    if source in BUILTIN_SOURCES:
        return load_builtin(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data.source: file not found: {source}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(
            f"data.source: {source} is not readable as Parquet ({first_line(exc)})"
        ) from None
    if table.num_rows == 0:
        raise DataError(f"data.source: {source} holds no rows")
    return table


def write_table(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` to a Parquet file, creating parent folders. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
