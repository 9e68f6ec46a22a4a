"""Converting what a caller hands to ``predict`` into the raw arrays preprocessing expects.

Images: encoded bytes (PNG/JPEG), PIL images, or uint8 arrays [N,H,W], [N,C,H,W] or [N,H,W,C].
Tabular: a 2-D array in feature order, or records (pandas DataFrame, pyarrow Table, dict of
columns, list of row dicts) from which the model's feature columns are taken by name.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kiln.data.decode import decode_images
from kiln.data.preprocess import Preprocessing
from kiln.errors import KilnError


class InputError(KilnError):
    """Inputs do not match what the model expects (shape, columns, undecodable image)."""


def raw_images(prep: Preprocessing, inputs: Any) -> np.ndarray:
    """uint8 [N, C, H, W] at the model's channel count and size."""
    channels, size = prep.image_layout()
    if isinstance(inputs, np.ndarray) and inputs.dtype != object:
        arr = inputs
        if arr.ndim == 3 and channels == 1:
            arr = arr[:, None]
        if arr.ndim == 4 and arr.shape[1] != channels and arr.shape[-1] == channels:
            arr = arr.transpose(0, 3, 1, 2)
        if arr.ndim != 4 or tuple(arr.shape[1:]) != (channels, *size):
            raise InputError(
                f"image array of shape {list(inputs.shape)} does not match [N, {channels}, "
                f"{size[0]}, {size[1]}]"
            )
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
                arr = arr * 255.0
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        return arr
    items = list(inputs)
    if (
        items
        and all(isinstance(i, np.ndarray) for i in items)
        and len({i.shape for i in items}) == 1
    ):
        return raw_images(prep, np.stack(items))
    encoded = []
    for item in items:
        if isinstance(item, (bytes, bytearray, memoryview)):
            encoded.append(bytes(item))
        elif hasattr(item, "save") or isinstance(
            item, np.ndarray
        ):  # a PIL image, or one HWC/HW array
            import io

            from PIL import Image

            img = (
                Image.fromarray(np.asarray(item, dtype=np.uint8))
                if isinstance(item, np.ndarray)
                else item
            )
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            encoded.append(buf.getvalue())
        else:
            raise InputError(f"unsupported image input of type {type(item).__name__}")
    try:
        arr, _, _ = decode_images(encoded, channels=channels, size=size, what="input")
    except KilnError as exc:
        raise InputError(str(exc)) from None
    return arr


def raw_tabular(prep: Preprocessing, inputs: Any) -> np.ndarray:
    """float32 [N, F] in the model's feature order (NaN where a value is null)."""
    names = prep.feature_names
    columns = _as_columns(inputs)
    if columns is None:
        arr = np.asarray(inputs, dtype=np.float32)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[1] != len(names):
            raise InputError(
                f"tabular input of shape {list(arr.shape)} does not match [N, {len(names)}]"
            )
        return arr
    missing = [n for n in names if n not in columns]
    if missing:
        raise InputError(f"missing feature columns: {', '.join(missing)}")
    try:
        cols = [
            np.asarray([np.nan if v is None else v for v in columns[n]], dtype=np.float32)
            for n in names
        ]
    except (TypeError, ValueError) as exc:
        raise InputError(f"feature values must be numbers ({exc})") from None
    return np.stack(cols, axis=1)


def _as_columns(inputs: Any) -> dict[str, list[Any]] | None:
    """Column dict from record-like inputs, or None for array-like inputs."""
    if hasattr(inputs, "to_pydict"):  # pyarrow Table / RecordBatch
        columns: dict[str, list[Any]] = inputs.to_pydict()
        return columns
    if hasattr(inputs, "to_dict") and hasattr(inputs, "columns"):  # pandas DataFrame
        return {str(k): list(v) for k, v in inputs.to_dict(orient="list").items()}
    if isinstance(inputs, dict):
        return {
            k: list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v]
            for k, v in inputs.items()
        }
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(r, dict) for r in inputs):
        keys = set().union(*inputs)
        return {k: [r.get(k) for r in inputs] for k in keys}
    return None


def to_raw(prep: Preprocessing, inputs: Any) -> np.ndarray:
    """Raw array for ``prep.apply`` from any supported input form. Raises InputError."""
    return raw_images(prep, inputs) if prep.kind == "image" else raw_tabular(prep, inputs)
