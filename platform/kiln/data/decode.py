"""Turning Arrow columns (or request payloads) into raw arrays.

Images become uint8 arrays ``[N, C, H, W]``; tabular rows become float32 ``[N, F]`` (NaN for
missing). The same functions serve training and prediction, so both see identical inputs.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kiln.errors import DataError

if TYPE_CHECKING:
    from PIL.Image import Image


def image_cell_bytes(cell: Any, base_dir: Path | None = None) -> bytes | None:
    """Encoded bytes of one image cell: raw bytes, or an HF ``{bytes, path}`` struct (path read if
    no bytes)."""
    if cell is None:
        return None
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell)
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"])
        if cell.get("path"):
            path = Path(cell["path"])
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if path.is_file():
                return path.read_bytes()
        return None
    raise TypeError(f"unsupported image cell of type {type(cell).__name__}")


def open_image(data: bytes) -> Image:
    """Decode encoded image bytes with PIL; raises ValueError when they do not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(str(exc) or "not an image") from None
    return img


def decode_images(
    encoded: Sequence[bytes | None],
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    what: str = "data.image",
) -> tuple[np.ndarray, int, tuple[int, int]]:
    """Decode encoded images to uint8 ``[N, C, H, W]``.

    ``channels`` None picks 3 if any image has colour, else 1; ``size`` None picks the most common
    (height, width). Returns (array, channels, size). Raises DataError naming the first bad row.
    """
    from PIL import Image

    images = []
    for i, data in enumerate(encoded):
        if data is None:
            raise DataError(f"{what}: row {i} has no image bytes")
        try:
            images.append(open_image(data))
        except ValueError as exc:
            raise DataError(f"{what}: row {i} does not decode as an image ({exc})") from None
    if not images:
        raise DataError(f"{what}: no images to decode")
    if channels is None:
        channels = 1 if all(img.mode in ("L", "1", "I", "I;16", "F") for img in images) else 3
    if size is None:
        size = Counter((img.height, img.width) for img in images).most_common(1)[0][0]
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(images), channels, size[0], size[1]), dtype=np.uint8)
    for i, img in enumerate(images):
        if img.mode in ("I", "I;16", "F"):
            arr = np.asarray(img, dtype=np.float64)
            hi = arr.max() or 1.0
            img = Image.fromarray((arr * (255.0 / hi)).astype(np.uint8), mode="L")
        img = img.convert(mode)
        if (img.height, img.width) != tuple(size):
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
        out[i] = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return out, channels, (int(size[0]), int(size[1]))


def check_image_column(schema: pa.Schema, column: str) -> None:
    """Raises DataError naming ``data.image`` when ``column`` is not in ``schema`` or does not hold
    encoded images (binary or string paths, or a Hugging Face ``{bytes, path}`` struct)."""
    if column not in schema.names:
        raise DataError(
            f"data.image: column '{column}' not found (columns: {', '.join(schema.names)})"
        )
    typ = schema.field(column).type
    if pa.types.is_struct(typ):
        names = [typ.field(i).name for i in range(typ.num_fields)]
        if "bytes" not in names:
            raise DataError(
                f"data.image: struct column '{column}' has no 'bytes' field (fields: "
                f"{', '.join(names)})"
            )
    elif not (pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_string(typ)):
        raise DataError(f"data.image: column '{column}' holds {typ}, not encoded image bytes")


def image_column(table: pa.Table, column: str, base_dir: Path | None = None) -> list[bytes | None]:
    """Encoded bytes of every row of an image column. Raises DataError for a missing/unsupported
    column."""
    check_image_column(table.schema, column)
    col = table.column(column)
    return [image_cell_bytes(cell, base_dir) for cell in col.to_pylist()]


def numeric_feature_columns(table: pa.Table, exclude: Iterable[str]) -> list[str]:
    """Every numeric (or boolean) column not in ``exclude``. Raises DataError for other column
    types."""
    excluded = set(exclude)
    features, rejected = [], []
    for field in table.schema:
        if field.name in excluded:
            continue
        if (
            pa.types.is_integer(field.type)
            or pa.types.is_floating(field.type)
            or pa.types.is_boolean(field.type)
        ):
            features.append(field.name)
        else:
            rejected.append(f"{field.name} ({field.type})")
    if rejected:
        raise DataError(
            "data.features: non-numeric columns "
            + ", ".join(rejected)
            + "; list the numeric feature columns in data.features or drop these columns"
        )
    if not features:
        raise DataError(
            "data.features: no numeric feature columns found (for images set data.image)"
        )
    return features


def tabular_matrix(table: pa.Table, features: Sequence[str]) -> np.ndarray:
    """float32 ``[N, F]`` from the named columns; nulls become NaN. Raises DataError for a
    missing/non-numeric column."""
    cols = []
    for name in features:
        if name not in table.column_names:
            raise DataError(
                f"data.features: column '{name}' not found (columns: "
                f"{', '.join(table.column_names)})"
            )
        col = table.column(name)
        if pa.types.is_boolean(col.type):
            col = pc.cast(col, pa.int8())
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            raise DataError(f"data.features: column '{name}' holds {col.type}, not numbers")
        cols.append(col.to_numpy(zero_copy_only=False).astype(np.float32))
    return np.stack(cols, axis=1) if cols else np.zeros((table.num_rows, 0), np.float32)
