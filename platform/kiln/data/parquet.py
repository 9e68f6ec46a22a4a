"""Writing Parquet with pyarrow (reading is ``kiln.data.source``: fragments Ray Data tasks read)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_table(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` to a Parquet file, creating parent folders. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
