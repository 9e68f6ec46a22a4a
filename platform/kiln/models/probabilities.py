"""Class probabilities from logits: the one softmax of the inference path."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``logits`` (n, classes), computed in float64 for stability; returns
    float64 probabilities whose rows sum to 1."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    probabilities: np.ndarray = p / p.sum(axis=1, keepdims=True)
    return probabilities
