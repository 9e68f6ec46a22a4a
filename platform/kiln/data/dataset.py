"""From ``data.*`` config to model-ready arrays: read, decode, encode labels, split, fit
preprocessing, hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kiln.data.config import DataConfig
from kiln.data.decode import (
    RawDataset,
    decode_images,
    image_column,
    numeric_feature_columns,
    tabular_matrix,
)
from kiln.data.parquet import read_source
from kiln.data.preprocess import Preprocessing, fit_image_preprocessing, fit_tabular_preprocessing
from kiln.data.profile import DataProfile, build_profile
from kiln.data.split import SplitIndices, stratified_split
from kiln.errors import DataError


@dataclass
class PreparedData:
    """Everything a training worker needs: normalized splits, preprocessing, labels and the data
    version."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: list[Any]
    preprocessing: Preprocessing
    dataset_hash: str
    split: SplitIndices
    profile: DataProfile | None = None

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> list[int]:
        return self.preprocessing.input_shape

    def class_weights(self) -> np.ndarray:
        """Inverse class frequency of the train split, normalized to mean 1 (absent classes get
        0)."""
        counts = np.bincount(self.y_train, minlength=self.num_classes).astype(np.float64)
        weights = np.where(
            counts > 0, counts.sum() / (self.num_classes * np.maximum(counts, 1)), 0.0
        )
        return weights.astype(np.float32)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def encode_labels(column: pa.ChunkedArray) -> tuple[np.ndarray, list[Any]]:
    """Map label values (ints or strings) to class indices; classes sorted. Raises DataError on
    nulls/floats."""
    if column.null_count:
        raise DataError(f"data.label: {column.null_count} rows have no label")
    typ = column.type
    if pa.types.is_floating(typ):
        values = column.to_numpy()
        if not np.all(np.mod(values, 1) == 0):
            raise DataError(
                "data.label: label column holds non-integer numbers (regression is not supported)"
            )
        values = values.astype(np.int64)
    elif pa.types.is_integer(typ) or pa.types.is_boolean(typ):
        values = column.to_numpy(zero_copy_only=False).astype(np.int64)
    elif pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_dictionary(typ):
        values = np.asarray([str(v) for v in column.to_pylist()], dtype=object)
    else:
        raise DataError(f"data.label: label column holds {typ}; use integers or strings")
    classes, y = np.unique(values, return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"data.label: only one class ({classes[0]!r}) in the data")
    labels = [c.item() if hasattr(c, "item") else str(c) for c in classes]
    return y.astype(np.int64), labels


def load_raw(cfg: DataConfig) -> RawDataset:
    """Read and decode ``cfg.source``. Raises DataError naming the config key at fault."""
    table = read_source(cfg.source)
    if cfg.label not in table.column_names:
        raise DataError(
            f"data.label: column '{cfg.label}' not found (columns: {', '.join(table.column_names)})"
        )
    y, labels = encode_labels(table.column(cfg.label))
    if cfg.image:
        base = Path(cfg.source).expanduser()
        base_dir = base if base.is_dir() else base.parent
        encoded = image_column(table, cfg.image, base_dir)
        size = (cfg.image_size[0], cfg.image_size[1]) if cfg.image_size else None
        x, _, _ = decode_images(encoded, size=size)
        return RawDataset(x=x, y=y, labels=labels, kind="image", feature_names=[])
    features = cfg.features or numeric_feature_columns(table, exclude=[cfg.label])
    return RawDataset(
        x=tabular_matrix(table, features),
        y=y,
        labels=labels,
        kind="tabular",
        feature_names=list(features),
    )


def dataset_hash(raw: RawDataset, cfg: DataConfig) -> str:
    """Content hash of the decoded data, the labels and the split parameters (sha256, 16 hex
    chars)."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "kind": raw.kind,
                "features": raw.feature_names,
                "labels": raw.labels,
                "shape": list(raw.x.shape),
                "split": cfg.split.model_dump(),
            },
            sort_keys=True,
        ).encode()
    )
    h.update(np.ascontiguousarray(raw.x).tobytes())
    h.update(np.ascontiguousarray(raw.y).tobytes())
    return h.hexdigest()[:16]


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Load, split (stratified, seeded), fit preprocessing on train only and normalize all
    splits."""
    raw = load_raw(cfg)
    split = stratified_split(raw.y, cfg.split.val, cfg.split.test, cfg.split.seed)
    if len(split.train) == 0:
        raise DataError("data.split: no rows left for training")
    train_raw = raw.x[split.train]
    if raw.kind == "image":
        prep = fit_image_preprocessing(train_raw)
    else:
        prep = fit_tabular_preprocessing(train_raw, raw.feature_names)

    def take(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return prep.apply(raw.x[idx]), raw.y[idx]

    x_train, y_train = take(split.train)
    x_val, y_val = take(split.val)
    x_test, y_test = take(split.test)
    digest = dataset_hash(raw, cfg)
    return PreparedData(
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=x_test,
        y_test=y_test,
        labels=raw.labels,
        preprocessing=prep,
        dataset_hash=digest,
        split=split,
        profile=build_profile(raw, split, cfg.source, digest),
    )
