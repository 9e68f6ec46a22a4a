"""Drift statistics of a window of live rows against a MonitorReference: per-feature PSI and
Kolmogorov-Smirnov (chi-square for categorical features), and the dataset-level drift score.

A feature drifts when its PSI reaches ``psi_threshold`` AND its test's p-value is below ``ks_alpha``:
PSI measures how large the change is, the test whether it is more than sampling noise of a small
window. The drift score is the share of monitored features that drift (0..1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kiln.monitor.reference import FeatureReference, MonitorReference

PSI_BINS = 10
EPS = 1e-4  # floor of a bin's share: an empty bin must not make PSI infinite


@dataclass
class FeatureDrift:
    name: str
    psi: float
    statistic: float  # KS D (numeric) or chi-square (categorical)
    p_value: float
    drifted: bool
    live_mean: float | None = None
    reference_mean: float | None = None


@dataclass
class DriftResult:
    """Drift of one window: the score, each feature's statistics, and the drifted features' names."""

    score: float
    rows: int
    features: list[FeatureDrift] = field(default_factory=list)

    @property
    def drifted(self) -> list[str]:
        return [f.name for f in self.features if f.drifted]

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "rows": self.rows, "drifted": self.drifted,
                "features": [asdict(f) for f in self.features]}


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two share vectors over the same bins."""
    e = np.maximum(np.asarray(expected, np.float64), EPS)
    a = np.maximum(np.asarray(actual, np.float64), EPS)
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def numeric_drift(ref: FeatureReference, live: np.ndarray, psi_threshold: float, alpha: float) -> FeatureDrift:
    from scipy.stats import ks_2samp

    sample = np.asarray(ref.sample, np.float64)
    live = live[~np.isnan(live)].astype(np.float64)
    # Decile bins of the reference; ties (integer or constant features) merge bins.
    edges = np.unique(np.quantile(sample, np.linspace(0, 1, PSI_BINS + 1)[1:-1]))
    expected = np.bincount(np.searchsorted(edges, sample, side="right"), minlength=len(edges) + 1)
    actual = np.bincount(np.searchsorted(edges, live, side="right"), minlength=len(edges) + 1)
    value = psi(expected / len(sample), actual / max(len(live), 1))
    test = ks_2samp(sample, live)
    p = float(test.pvalue)
    return FeatureDrift(ref.name, value, float(test.statistic), p, value >= psi_threshold and p < alpha,
                        float(live.mean()) if len(live) else None, float(sample.mean()))


def categorical_drift(ref: FeatureReference, live: np.ndarray, psi_threshold: float, alpha: float) -> FeatureDrift:
    from scipy.stats import chisquare

    k = len(ref.proportions)
    counts = np.bincount(np.clip(live.astype(int), 0, k - 1), minlength=k).astype(np.float64)
    expected = np.maximum(np.asarray(ref.proportions, np.float64), EPS)
    expected = expected / expected.sum()
    value = psi(expected, counts / max(counts.sum(), 1.0))
    test = chisquare(counts, expected * counts.sum())
    p = float(test.pvalue)
    return FeatureDrift(ref.name, value, float(test.statistic), p, value >= psi_threshold and p < alpha)


def drift(reference: MonitorReference, window: np.ndarray, psi_threshold: float, alpha: float) -> DriftResult:
    """Drift of ``window`` (rows x monitored features, in the reference's feature order)."""
    features = []
    for i, ref in enumerate(reference.features):
        measure = categorical_drift if ref.kind == "categorical" else numeric_drift
        features.append(measure(ref, window[:, i], psi_threshold, alpha))
    score = sum(f.drifted for f in features) / max(len(features), 1)
    return DriftResult(score=float(score), rows=int(len(window)), features=features)
