"""Drift statistics of a window of live rows against a MonitorReference: per-feature PSI and
Kolmogorov-Smirnov (chi-square for categorical features), and the dataset-level drift score.

A feature drifts when its PSI reaches ``psi_threshold`` AND its test's p-value is below
``ks_alpha``: PSI measures how large the change is, the test whether it is more than sampling noise
of a small window. The drift score is the share of monitored features that drift (0..1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kiln.monitor.reference.build import FeatureReference, MonitorReference

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
    """Drift of one window: the score, each feature's statistics, and the drifted features'
    names."""

    score: float
    rows: int
    features: list[FeatureDrift] = field(default_factory=list)

    @property
    def drifted(self) -> list[str]:
        return [f.name for f in self.features if f.drifted]

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "rows": self.rows,
            "drifted": self.drifted,
            "features": [asdict(f) for f in self.features],
        }


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two share vectors over the same bins."""
    e = np.maximum(np.asarray(expected, np.float64), EPS)
    a = np.maximum(np.asarray(actual, np.float64), EPS)
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


class NumericStatistic:
    """PSI and two-sample KS of one numeric feature; the reference's bins, shares and sorted sample
    are prepared once (an evaluation runs every ``eval_every`` rows: numpy only, no per-call
    set-up)."""

    def __init__(self, ref: FeatureReference):
        self.ref = ref
        self.sample = np.asarray(ref.sample, np.float64)
        # Decile bins of the reference; ties (integer or constant features) merge bins.
        self.edges = np.unique(np.quantile(self.sample, np.linspace(0, 1, PSI_BINS + 1)[1:-1]))
        counts = np.bincount(
            np.searchsorted(self.edges, self.sample, side="right"), minlength=len(self.edges) + 1
        )
        self.expected = counts / len(self.sample)
        self.mean = float(self.sample.mean())

    def measure(self, live: np.ndarray, psi_threshold: float, alpha: float) -> FeatureDrift:
        from scipy.special import kolmogorov

        live = np.sort(live[~np.isnan(live)].astype(np.float64))
        n, m = len(self.sample), len(live)
        if m == 0:
            return FeatureDrift(self.ref.name, 0.0, 0.0, 1.0, False, None, self.mean)
        actual = np.bincount(
            np.searchsorted(self.edges, live, side="right"), minlength=len(self.edges) + 1
        )
        value = psi(self.expected, actual / m)
        # KS: the largest gap between the two empirical CDFs, over every value of either sample.
        points = np.concatenate([self.sample, live])
        gap = np.abs(
            np.searchsorted(self.sample, points, side="right") / n
            - np.searchsorted(live, points, side="right") / m
        )
        d = float(gap.max())
        en = n * m / (n + m)
        p = float(
            kolmogorov((np.sqrt(en) + 0.12 + 0.11 / np.sqrt(en)) * d)
        )  # asymptotic (Stephens' correction)
        return FeatureDrift(
            self.ref.name,
            value,
            d,
            p,
            value >= psi_threshold and p < alpha,
            float(live.mean()),
            self.mean,
        )


class CategoricalStatistic:
    """PSI and chi-square goodness of fit of one categorical feature against the reference's
    shares."""

    def __init__(self, ref: FeatureReference):
        self.ref = ref
        self.k = len(ref.proportions)
        expected = np.maximum(np.asarray(ref.proportions, np.float64), EPS)
        self.expected = expected / expected.sum()

    def measure(self, live: np.ndarray, psi_threshold: float, alpha: float) -> FeatureDrift:
        from scipy.special import chdtrc

        counts = np.bincount(np.clip(live.astype(int), 0, self.k - 1), minlength=self.k).astype(
            np.float64
        )
        total = max(counts.sum(), 1.0)
        value = psi(self.expected, counts / total)
        expected = self.expected * total
        statistic = float(((counts - expected) ** 2 / expected).sum())
        p = float(chdtrc(self.k - 1, statistic)) if self.k > 1 else 1.0
        return FeatureDrift(
            self.ref.name, value, statistic, p, value >= psi_threshold and p < alpha
        )


def prepare(reference: MonitorReference) -> list:
    """One prepared statistic per monitored feature, in the reference's order."""
    return [
        CategoricalStatistic(f) if f.kind == "categorical" else NumericStatistic(f)
        for f in reference.features
    ]


def drift(statistics: list, window: np.ndarray, psi_threshold: float, alpha: float) -> DriftResult:
    """Drift of ``window`` (rows x monitored features, in the reference's feature order), with the
    statistics ``prepare`` made for the reference."""
    features = [
        stat.measure(window[:, i], psi_threshold, alpha) for i, stat in enumerate(statistics)
    ]
    score = sum(f.drifted for f in features) / max(len(features), 1)
    return DriftResult(score=float(score), rows=int(len(window)), features=features)
