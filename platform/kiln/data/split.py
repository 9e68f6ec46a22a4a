"""Deterministic stratified splits: the same labels and seed give the same split on any machine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SplitIndices:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def stratified_split(labels: np.ndarray, val: float, test: float, seed: int) -> SplitIndices:
    """Split row indices per class into train/val/test with the given fractions.

    Each class is shuffled with its own PCG64 stream (seeded from ``seed`` and the class index),
    so the result depends only on the labels and the seed, never on worker count or platform.
    A class keeps at least one training row.
    """
    labels = np.asarray(labels)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng = np.random.Generator(np.random.PCG64([seed, int(cls)]))
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        n_test = min(int(round(n * test)), max(n - 1, 0))
        n_val = min(int(round(n * val)), max(n - 1 - n_test, 0))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    joined = {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in parts.items()}
    return SplitIndices(**joined)
