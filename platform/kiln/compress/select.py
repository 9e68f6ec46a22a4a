"""Accuracy-aware selection: the best variant (by size, latency or throughput) within an accuracy
tolerance."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.compress.config import SelectionConfig
from kiln.compress.evaluate import Metrics


@dataclass
class Selection:
    name: str | None  # the picked variant, or None
    message: str  # what was decided, for people


def _key(objective: str, m: Metrics):
    # Lower is better; ties go to the more accurate variant.
    if objective == "size":
        return (m.size_bytes, -m.test_accuracy)
    if objective == "latency":
        return (m.latency_p50_ms, -m.test_accuracy)
    return (-m.throughput, -m.test_accuracy)


def accuracy_drop(reference: Metrics, variant: Metrics) -> float:
    """Points of test accuracy lost (as a fraction; negative when the variant is more accurate)."""
    return reference.test_accuracy - variant.test_accuracy


def select_variant(
    reference: Metrics, variants: dict[str, Metrics], rule: SelectionConfig
) -> Selection:
    """Pick among ``variants`` those whose accuracy drop is at most ``rule.max_accuracy_drop``, then
    the best by ``rule.objective``. No tolerance configured or none qualifying: ``Selection(None,
    why)``."""
    if rule.max_accuracy_drop is None:
        return Selection(None, "no selection rule (compress.selection.max_accuracy_drop is unset)")
    tol = rule.max_accuracy_drop
    qualifying = {n: m for n, m in variants.items() if accuracy_drop(reference, m) <= tol + 1e-12}
    if not qualifying:
        closest = min(variants, key=lambda n: accuracy_drop(reference, variants[n]), default=None)
        detail = (
            f"; closest: {closest}, {100 * accuracy_drop(reference, variants[closest]):.2f} points"
            if closest
            else ""
        )
        return Selection(
            None,
            f"no variant is within {100 * tol:.2f} points of the reference's accuracy"
            f"{detail}; alias '{rule.alias}' not set",
        )
    best = min(qualifying, key=lambda n: _key(rule.objective, qualifying[n]))
    word = {
        "size": "smallest",
        "latency": "fastest (batch-1 p50)",
        "throughput": "highest-throughput",
    }[rule.objective]
    return Selection(
        best,
        f"{best}: the {word} of {len(qualifying)} variant(s) within {100 * tol:.2f} points "
        f"of the reference's accuracy",
    )
