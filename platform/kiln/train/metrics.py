"""Classification metrics from a confusion matrix: accuracy, macro-F1, per-class report."""

from __future__ import annotations

from typing import Any

import numpy as np

# What the training loop logs every epoch, in the order it computes them (train, then validation).
# ASHA and tune objectives act on these; train's --json "epochs" rows list them in this order.
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "val_f1_macro")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    idx = np.asarray(y_true, np.int64) * num_classes + np.asarray(y_pred, np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, f1, support) per class; 0 where undefined."""
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return precision, recall, f1, support


def f1_macro(cm: np.ndarray) -> float:
    """Unweighted mean F1 over classes that occur in the labels or the predictions (as
    scikit-learn)."""
    _, _, f1, support = per_class(cm)
    present = (support > 0) | (cm.sum(axis=0) > 0)
    return float(f1[present].mean()) if present.any() else 0.0


def accuracy(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm) / total) if total else 0.0


def classification_report(cm: np.ndarray, labels: list[Any]) -> list[dict[str, Any]]:
    """One row per class: label, precision, recall, f1, support."""
    precision, recall, f1, support = per_class(cm)
    return [
        {
            "label": labels[i],
            "precision": round(float(precision[i]), 4),
            "recall": round(float(recall[i]), 4),
            "f1": round(float(f1[i]), 4),
            "support": int(support[i]),
        }
        for i in range(len(labels))
    ]
