"""Where the rows come from: a Parquet file or folder cut into fragments (runs of row groups) that
Ray Data tasks read, each knowing the global index of its first row.

The driver reads only Parquet footers (row counts), never rows. A built-in source (digits, mnist)
is written once to a Parquet file in Kiln's cache folder and then read like a user's file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kiln.data.builtin import BUILTIN_SOURCES, load_builtin
from kiln.errors import DataError, first_line

# A fragment is a task's unit of reading: consecutive row groups of one file, up to this many rows
# (a large row group is one fragment whatever its size: Parquet cannot read less than a row group).
FRAGMENT_ROWS = 65_536
MAX_FILES = 100_000


@dataclass(frozen=True)
class Fragment:
    """Rows ``[offset, offset + rows)`` of the dataset: row groups ``row_groups`` of ``path``."""

    filesystem: pafs.FileSystem
    path: str
    row_groups: tuple[int, ...]
    offset: int
    rows: int


def cache_dir() -> Path:
    """Kiln's cache folder (``KILN_CACHE_DIR``, default ``~/.cache/kiln``)."""
    return Path(os.environ.get("KILN_CACHE_DIR", "~/.cache/kiln")).expanduser()


def builtin_parquet(name: str) -> Path:
    """The built-in source ``name`` as a Parquet file, written once (atomically) into the cache."""
    path = cache_dir() / "builtin" / f"{name}-v1.parquet"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        table = load_builtin(name)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp, row_group_size=FRAGMENT_ROWS)
        os.replace(tmp, path)  # another process may have written the same file: same bytes
    return path


def _filesystem(source: str) -> tuple[pafs.FileSystem, str]:
    if "://" in source:
        try:
            fs, path = pafs.FileSystem.from_uri(source)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise DataError(f"data.source: cannot open {source} ({first_line(exc)})") from None
        return fs, str(path)
    return pafs.LocalFileSystem(), str(Path(source).expanduser().resolve())


def list_files(source: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files of ``data.source`` (a file, or every ``*.parquet`` under a folder, sorted).

    Raises DataError when nothing is there."""
    fs, path = _filesystem(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data.source: file not found: {source}")
    if info.type == pafs.FileType.File:
        return fs, [path]
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(
        f.path
        for f in found
        if f.type == pafs.FileType.File
        and not Path(f.path).name.startswith((".", "_"))
        and f.path.endswith((".parquet", ".parq", ".pq"))
    )
    if not files:
        raise DataError(f"data.source: {source} holds no Parquet files")
    if len(files) > MAX_FILES:
        raise DataError(f"data.source: {source} holds {len(files)} files (limit {MAX_FILES})")
    return fs, files


def resolve_source(source: str) -> str:
    """The path Ray Data tasks read: the cached Parquet file of a built-in source, else
    ``source``."""
    return str(builtin_parquet(source)) if source in BUILTIN_SOURCES else source


def fragments(source: str) -> tuple[list[Fragment], pa.Schema]:
    """Cut ``data.source`` into fragments (footers only). Returns (fragments, the first file's
    schema). Raises DataError for a missing or unreadable source, or one with no rows."""
    fs, files = list_files(resolve_source(source))
    out: list[Fragment] = []
    schema: pa.Schema | None = None
    offset = 0
    for path in files:
        try:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                if schema is None:
                    schema = meta.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(
                f"data.source: {source} is not readable as Parquet ({first_line(exc)})"
            ) from None
        groups: list[int] = []
        rows = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if groups and rows + n > FRAGMENT_ROWS:
                out.append(Fragment(fs, path, tuple(groups), offset, rows))
                offset += rows
                groups, rows = [], 0
            groups.append(g)
            rows += n
        if rows:
            out.append(Fragment(fs, path, tuple(groups), offset, rows))
            offset += rows
    if offset == 0 or schema is None:
        raise DataError(f"data.source: {source} holds no rows")
    return out, schema


def read_fragment(fragment: Fragment, columns: list[str]) -> pa.Table:
    """The rows of one fragment, only ``columns`` (in a Ray Data task)."""
    with fragment.filesystem.open_input_file(fragment.path) as f:
        return pq.ParquetFile(f).read_row_groups(list(fragment.row_groups), columns=columns)
