"""Synthetic data sets written as Parquet, in layouts users have (no downloads at test time)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def tabular_parquet(path: Path, rows: int = 600, seed: int = 0, nulls: bool = True) -> Path:
    """Three string classes, features on wildly different scales, one useless column, a few
    nulls."""
    rng = np.random.default_rng(seed)
    names = np.array(["cat", "dog", "emu"])
    cls = rng.integers(0, 3, rows)
    big = cls * 1000.0 + rng.normal(0, 250, rows)  # scale ~1e3
    tiny = (2 - cls) * 1e-3 + rng.normal(0, 3e-4, rows)  # scale ~1e-3
    count = rng.poisson(3 + 2 * cls).astype(np.int64)  # integer feature
    noise = rng.normal(0, 1, rows)
    big_col = pa.array(big, mask=(rng.random(rows) < 0.02) if nulls else None)
    table = pa.table(
        {"big": big_col, "tiny": tiny, "count": count, "noise": noise, "species": names[cls]}
    )
    pq.write_table(table, path)
    return path


def _encode(img: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def shape_images(
    rows: int = 300, seed: int = 0, size: int = 16
) -> tuple[list[np.ndarray], np.ndarray]:
    """RGB images of three classes: a horizontal bar, a vertical bar, a filled square, in random
    colours."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, rows)
    images = []
    for c in labels:
        img = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)
        colour = rng.integers(150, 256, 3).astype(np.uint8)
        o = rng.integers(2, size - 6)
        if c == 0:
            img[o : o + 3, 2:-2] = colour
        elif c == 1:
            img[2:-2, o : o + 3] = colour
        else:
            img[o : o + 5, o : o + 5] = colour
        images.append(img)
    return images, labels


def hf_image_parquet(path: Path, rows: int = 300, seed: int = 0) -> Path:
    """Hugging Face datasets' Parquet layout: image = {bytes, path} struct, PNG and JPEG mixed;
    string labels."""
    images, labels = shape_images(rows, seed)
    names = np.array(["hbar", "vbar", "square"])
    cells = [
        {"bytes": _encode(img, "PNG" if i % 2 else "JPEG"), "path": f"img_{i}.png"}
        for i, img in enumerate(images)
    ]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(cells, type=image_type), "label": names[labels]})
    pq.write_table(table, path)
    return path
