"""MLflow python_function loader for Kiln artifacts (no pickles: spec.json + weights)."""

from __future__ import annotations

from typing import Any


class _KilnPyfunc:
    def __init__(self, predictor):
        self.predictor = predictor

    def predict(self, model_input: Any, params: dict | None = None) -> list:
        return self.predictor.predict(model_input)


def _load_pyfunc(path: str):
    from kiln.models.predictor import load_predictor

    return _KilnPyfunc(load_predictor(path))
