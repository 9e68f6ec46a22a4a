"""A fixed-size ring buffer of the most recent monitored rows: appending is a slice copy, no
allocation."""

from __future__ import annotations

import numpy as np


class RowWindow:
    """The last ``capacity`` rows of monitored features, with each row's OOD flag."""

    def __init__(self, capacity: int, width: int):
        self.capacity = capacity
        self.rows = np.zeros((capacity, width), np.float32)
        self.flags = np.zeros(capacity, bool)
        self.total = 0  # rows written (a request larger than the window writes only its last rows)
        self.seen = 0  # rows observed

    def __len__(self) -> int:
        return min(self.total, self.capacity)

    def append(self, rows: np.ndarray, flags: np.ndarray) -> None:
        n = len(rows)
        self.seen += n
        if n >= self.capacity:  # a request larger than the window: keep its last rows
            rows, flags, n = rows[-self.capacity :], flags[-self.capacity :], self.capacity
        start = self.total % self.capacity
        first = min(n, self.capacity - start)
        self.rows[start : start + first] = rows[:first]
        self.flags[start : start + first] = flags[:first]
        if first < n:
            self.rows[: n - first] = rows[first:]
            self.flags[: n - first] = flags[first:]
        self.total += n

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the window's rows and flags, oldest first."""
        n = len(self)
        if self.total <= self.capacity:
            return self.rows[:n].copy(), self.flags[:n].copy()
        start = self.total % self.capacity
        order = np.r_[start : self.capacity, 0:start]
        return self.rows[order], self.flags[order]
