"""Data profiles: split sizes, class balance, per-feature or image statistics, and leakage checks.

A profile is plain JSON. Every training run logs its train split's profile as the reference that
production monitoring compares live traffic with (per-feature quantiles and histograms).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kiln.data.decode import RawDataset
from kiln.data.split import SplitIndices

QUANTILES = [
    round(q, 2) for q in np.linspace(0, 1, 101)
]  # 1% resolution: enough for KS and PSI bins
HIST_BINS = 20


@dataclass
class DataProfile:
    source: str
    kind: str
    dataset_hash: str
    rows: dict[str, int]
    labels: list[Any]
    class_counts: dict[str, list[int]]
    imbalance_ratio: float
    features: list[dict[str, Any]] = field(default_factory=list)
    images: dict[str, Any] = field(default_factory=dict)
    leakage: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def has_leak(self) -> bool:
        return any(self.leakage.get(k, 0) for k in ("train_val", "train_test", "val_test"))


def feature_stats(name: str, values: np.ndarray) -> dict[str, Any]:
    """Missing count, moments, 1%-quantiles and a histogram of one numeric column (NaN =
    missing)."""
    values = np.asarray(values, np.float64)
    present = values[~np.isnan(values)]
    stats: dict[str, Any] = {
        "name": name,
        "count": int(len(values)),
        "missing": int(len(values) - len(present)),
    }
    if len(present) == 0:
        return stats
    counts, edges = np.histogram(present, bins=HIST_BINS)
    stats.update(
        {
            "mean": float(present.mean()),
            "std": float(present.std()),
            "min": float(present.min()),
            "max": float(present.max()),
            "quantiles": np.quantile(present, QUANTILES).tolist(),
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        }
    )
    return stats


def image_stats(x: np.ndarray) -> dict[str, Any]:
    """Size, channels and per-channel intensity statistics of uint8 images [N, C, H, W]."""
    n, c, h, w = x.shape
    per_image_mean = x.reshape(n, c, -1).mean(axis=2) / 255.0
    counts, edges = np.histogram(x, bins=32, range=(0, 256))
    return {
        "count": int(n),
        "channels": int(c),
        "height": int(h),
        "width": int(w),
        "channel_mean": (x.mean(axis=(0, 2, 3)) / 255.0).tolist(),
        "channel_std": (x.std(axis=(0, 2, 3)) / 255.0).tolist(),
        "image_brightness": feature_stats("brightness", per_image_mean.mean(axis=1)),
        "pixel_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }


def row_digests(x: np.ndarray) -> np.ndarray:
    """A digest per row of the raw data (features or pixels), to find identical rows."""
    flat = np.ascontiguousarray(x.reshape(len(x), -1))
    return np.array([hashlib.blake2b(r.tobytes(), digest_size=12).hexdigest() for r in flat])


def leakage(x: np.ndarray, split: SplitIndices) -> dict[str, Any]:
    """Rows of val/test identical to a row of another split (same input, label ignored)."""
    digests = row_digests(x)
    parts = {name: set(digests[getattr(split, name)]) for name in ("train", "val", "test")}

    def shared(a: str, b: str) -> int:
        other = parts[a]
        return int(sum(d in other for d in digests[getattr(split, b)]))

    train_digests = digests[split.train]
    return {
        "train_val": shared("train", "val"),
        "train_test": shared("train", "test"),
        "val_test": shared("val", "test"),
        "duplicates_within_train": int(len(train_digests) - len(set(train_digests))),
    }


def build_profile(
    raw: RawDataset, split: SplitIndices, source: str, dataset_hash: str
) -> DataProfile:
    """Profile a RawDataset under its split. Feature statistics describe the train split (raw
    values)."""
    n_classes = len(raw.labels)
    counts = {
        name: np.bincount(raw.y[getattr(split, name)], minlength=n_classes).tolist()
        for name in ("train", "val", "test")
    }
    train_counts = np.array(counts["train"])
    nonzero = train_counts[train_counts > 0]
    profile = DataProfile(
        source=source,
        kind=raw.kind,
        dataset_hash=dataset_hash,
        rows={
            "total": int(len(raw.y)),
            "train": int(len(split.train)),
            "val": int(len(split.val)),
            "test": int(len(split.test)),
        },
        labels=list(raw.labels),
        class_counts=counts,
        imbalance_ratio=float(nonzero.max() / nonzero.min()) if len(nonzero) else 0.0,
        leakage=leakage(raw.x, split),
    )
    train_x = raw.x[split.train]
    if raw.kind == "tabular":
        profile.features = [
            feature_stats(name, train_x[:, i]) for i, name in enumerate(raw.feature_names)
        ]
    else:
        profile.images = image_stats(train_x)
    return profile
