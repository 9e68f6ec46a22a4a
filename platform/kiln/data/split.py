"""The stratified split, streaming: each row's seeded key (from its content, see ``rows``) is
compared with two cut points of its class.

A class of at most ``EXACT_CLASS_ROWS`` rows has its keys collected (8 bytes a row) and cut at
exact ranks, so its split counts are exactly those of a per-class shuffle (``round(n * test)`` test
rows, ``round(n * val)`` validation rows, at least one training row). A larger class is cut at the
fractions themselves: keys are uniform, so its proportions are off by a binomial error (for
20,000 rows and a 15% split, one standard deviation is 0.25 percentage points). Rows with the same
content and label share a key and always land in the same split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EXACT_CLASS_ROWS = 20_000
KEY_SPACE = 1 << 64

TRAIN, VAL, TEST = 0, 1, 2
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitCuts:
    """Per class index: rows with ``key < test_cut`` are test, ``key < val_cut`` validation, the
    rest training."""

    test_cut: np.ndarray  # uint64 [num_classes]
    val_cut: np.ndarray  # uint64 [num_classes]

    def assign(self, classes: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """The split (TRAIN, VAL or TEST) of each row, from its class index and key."""
        keys = np.asarray(keys, np.uint64)
        return np.where(
            keys < self.test_cut[classes], TEST, np.where(keys < self.val_cut[classes], VAL, TRAIN)
        ).astype(np.int8)


def exact_counts(n: int, val: float, test: float) -> tuple[int, int]:
    """(test rows, validation rows) of a class of ``n`` rows; a class keeps one training row."""
    n_test = min(int(round(n * test)), max(n - 1, 0))
    n_val = min(int(round(n * val)), max(n - 1 - n_test, 0))
    return n_test, n_val


def _fraction_cut(fraction: float) -> int:
    return min(int(round(fraction * KEY_SPACE)), KEY_SPACE - 1)


def class_cuts(
    counts: list[int], keys: list[np.ndarray | None], val: float, test: float
) -> SplitCuts:
    """Cut points of every class: exact ranks where the class's keys were collected, else the
    fractions."""
    test_cut = np.zeros(len(counts), np.uint64)
    val_cut = np.zeros(len(counts), np.uint64)
    for c, (n, class_keys) in enumerate(zip(counts, keys, strict=True)):
        if class_keys is not None:
            ordered = np.sort(np.asarray(class_keys, np.uint64))
            n_test, n_val = exact_counts(n, val, test)
            test_cut[c] = ordered[n_test]
            val_cut[c] = ordered[n_test + n_val]
        else:
            test_cut[c] = np.uint64(_fraction_cut(test))
            val_cut[c] = np.uint64(_fraction_cut(test + val))
    return SplitCuts(test_cut=test_cut, val_cut=val_cut)
