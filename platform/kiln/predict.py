"""Public Python API: ``kiln.predict.load_model(uri)`` returns a Predictor."""

from kiln.models.predictor import Predictor
from kiln.models.predictor import load_predictor as load_model

__all__ = ["Predictor", "load_model"]
