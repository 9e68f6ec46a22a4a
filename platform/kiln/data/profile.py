"""Data profiles: split sizes, class balance, per-feature or image statistics, and leakage checks.

A profile is plain JSON. Every training run logs its train split's profile as the reference that
production monitoring compares live traffic with (per-feature quantiles and histograms).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

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
    # sizes of the deterministic samples that quantiles, histograms and leakage come from
    sampling: dict[str, Any] = field(default_factory=dict)

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


def build_profile(
    *,
    source: str,
    kind: str,
    dataset_hash: str,
    labels: list[Any],
    class_counts: np.ndarray,
    features: list[dict[str, Any]],
    images: dict[str, Any],
    leakage: dict[str, Any],
    sampling: dict[str, Any],
) -> DataProfile:
    """A DataProfile from streamed results: ``class_counts`` [3, classes] (train, val, test)."""
    counts = {name: class_counts[i].tolist() for i, name in enumerate(("train", "val", "test"))}
    train_counts = np.asarray(counts["train"])
    nonzero = train_counts[train_counts > 0]
    sizes = {name: int(sum(c)) for name, c in counts.items()}
    return DataProfile(
        source=source,
        kind=kind,
        dataset_hash=dataset_hash,
        rows={"total": sum(sizes.values()), **sizes},
        labels=list(labels),
        class_counts=counts,
        imbalance_ratio=float(nonzero.max() / nonzero.min()) if len(nonzero) else 0.0,
        features=features,
        images=images,
        leakage=leakage,
        sampling=sampling,
    )
