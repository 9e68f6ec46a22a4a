"""Rendering a finished run: confusion-matrix PNG, per-class table, terminal summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def failure_line(exc: BaseException, limit: int = 500) -> str:
    """The most telling line of a Ray Train or Ray Tune failure: the last line that names an error
    (the worker's own exception, not Ray's wrapper around it), else the last line, else the
    exception's type name; at most ``limit`` characters. ``kiln.errors.first_line`` is for
    errors whose first line says it all; Ray puts the cause at the end."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if ("Error" in line or "Exception" in line) and not line.startswith("File "):
            return line[:limit]
    return (lines[-1] if lines else type(exc).__name__)[:limit]


def confusion_matrix_png(
    cm: np.ndarray, labels: list[Any], path: str | Path, title: str = "Test confusion matrix"
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    size = min(12, 2 + 0.5 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), [str(label) for label in labels], rotation=45 if n > 10 else 0)
    ax.set_yticks(range(n), [str(label) for label in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        hi = cm.max() or 1
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if cm[i, j] > hi / 2 else "black",
                )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain aligned text table."""

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
        for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
