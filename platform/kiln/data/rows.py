"""Per-row work done inside Ray Data tasks: label values, content digests and the seeded keys that
decide a row's split and its place in the deterministic sample.

Every value here depends only on the row's content (its input and its label) and the split seed,
never on the row's file, block or position, so the split, the hash and the statistics are the same
however the data is cut into files, blocks or workers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kiln.data.decode import image_cell_bytes
from kiln.errors import DataError

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
SAMPLE_SALT = 0x5A3C_17E9_0B44_D2A1  # the sample key: a second, independent draw per row
LANE_SALT = 0x2545_F491_4F6C_DD1D  # the hash's second 64-bit lane


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on a uint64 array (wrapping arithmetic): a bijective bit mixer."""
    x = np.asarray(x, np.uint64)
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    out: np.ndarray = x ^ (x >> np.uint64(31))
    return out


def salted(x: np.ndarray, salt: int) -> np.ndarray:
    """``mix64(x + mix(salt))``: an independent key per salt (a seed, or one of the salts
    above)."""
    s = mix64(np.array([salt & 0xFFFF_FFFF_FFFF_FFFF], np.uint64))[0]
    return mix64(np.asarray(x, np.uint64) + s)


def _digest_bytes(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def tabular_digests(x: np.ndarray) -> np.ndarray:
    """A 64-bit digest of each float32 row (every NaN counts as the same missing value)."""
    x = np.where(np.isnan(x), np.float32(np.nan), x).astype(np.float32)
    bits = np.ascontiguousarray(x).view(np.uint32).astype(np.uint64)
    h = np.full(len(x), _GOLDEN, np.uint64) * np.uint64(x.shape[1] + 1)
    for j in range(bits.shape[1]):
        h = mix64(h ^ (bits[:, j] + _GOLDEN * np.uint64(j + 1)))
    return h


def bytes_digests(cells: list[bytes]) -> np.ndarray:
    """A 64-bit digest of each encoded value (blake2b)."""
    return np.fromiter((_digest_bytes(c) for c in cells), np.uint64, len(cells))


def label_digests(values: np.ndarray) -> np.ndarray:
    """A 64-bit digest of each label value (ints and strings never collide)."""
    uniq, inverse = np.unique(values, return_inverse=True)
    prefix = "s:" if values.dtype == object else "i:"
    table = np.fromiter(
        (_digest_bytes(f"{prefix}{v}".encode()) for v in uniq), np.uint64, len(uniq)
    )
    return table[inverse.reshape(-1)]


def label_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Label values as int64 (ints, bools, integral floats) or str objects. Raises DataError on
    nulls and non-integer numbers."""
    if column.null_count:
        raise DataError(f"data.label: {column.null_count} rows have no label")
    typ = column.type
    if pa.types.is_floating(typ):
        values = column.to_numpy()
        if not np.all(np.mod(values, 1) == 0):
            raise DataError(
                "data.label: label column holds non-integer numbers (regression is not supported)"
            )
        ints: np.ndarray = values.astype(np.int64)
        return ints
    if pa.types.is_integer(typ) or pa.types.is_boolean(typ):
        ints = column.to_numpy(zero_copy_only=False).astype(np.int64)
        return ints
    if pa.types.is_dictionary(typ):
        column = pc.cast(column, pa.string())
    return np.asarray([str(v) for v in column.to_pylist()], dtype=object)


def check_label_type(typ: pa.DataType) -> None:
    """Raises DataError for a label column of a type that is neither numbers nor strings."""
    ok = (
        pa.types.is_floating(typ)
        or pa.types.is_integer(typ)
        or pa.types.is_boolean(typ)
        or pa.types.is_string(typ)
        or pa.types.is_large_string(typ)
        or pa.types.is_dictionary(typ)
    )
    if not ok:
        raise DataError(f"data.label: label column holds {typ}; use integers or strings")


@dataclass(frozen=True)
class RowLayout:
    """Which columns a task reads and how: everything a task needs, small and picklable."""

    kind: str  # "image" | "tabular"
    label: str
    image: str | None
    features: tuple[str, ...]
    base_dir: str | None  # relative image paths of {bytes, path} cells are read from here
    seed: int

    @property
    def columns(self) -> list[str]:
        return [self.label, *([self.image] if self.image else self.features)]


@dataclass
class KeyedRows:
    """One fragment's rows, keyed: ``x`` float32 [N, F] (tabular) or encoded bytes (images)."""

    labels: np.ndarray
    x: Any
    input_digest: np.ndarray  # uint64: the input alone (leakage between splits)
    content_digest: np.ndarray  # uint64: input and label (the dataset hash)
    split_key: np.ndarray  # uint64, seeded: the row's place in its class's split
    sample_key: np.ndarray  # uint64, seeded: the row's place in the deterministic sample


def key_rows(table: pa.Table, layout: RowLayout, first_row: int) -> KeyedRows:
    """Labels, inputs and keys of ``table`` (rows ``first_row...``). Raises DataError naming the
    first row at fault by its index in the whole dataset."""
    from kiln.data.decode import tabular_matrix

    labels = label_values(table.column(layout.label))
    if layout.kind == "image":
        assert layout.image is not None
        base = Path(layout.base_dir) if layout.base_dir else None
        cells = []
        for i, cell in enumerate(table.column(layout.image).to_pylist()):
            data = image_cell_bytes(cell, base)
            if data is None:
                raise DataError(f"data.image: row {first_row + i} has no image bytes")
            cells.append(data)
        x: Any = cells
        inputs = bytes_digests(cells)
    else:
        x = tabular_matrix(table, layout.features)
        inputs = tabular_digests(x)
    content = mix64(inputs ^ mix64(label_digests(labels)))
    return KeyedRows(
        labels=labels,
        x=x,
        input_digest=inputs,
        content_digest=content,
        split_key=salted(content, layout.seed),
        sample_key=salted(content, layout.seed ^ SAMPLE_SALT),
    )
