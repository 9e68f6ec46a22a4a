"""MLflow python_function loader for Kiln artifacts (no pickles: spec.json + weights)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.models.predictor import Predictor


class _KilnPyfunc:
    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[Any]:
        predictions: list[Any] = self.predictor.predict(model_input)
        return predictions


def _load_pyfunc(path: str) -> _KilnPyfunc:
    """MLflow's loader entry point: the artifact at ``path`` as a python_function model."""
    from kiln.models.predictor import load_predictor

    return _KilnPyfunc(load_predictor(path))
