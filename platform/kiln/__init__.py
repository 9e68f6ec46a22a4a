"""Kiln: train, tune, compress and serve PyTorch models on Ray."""

from kiln.version import __version__

__all__ = ["__version__", "load_model"]


def __getattr__(name):
    # Lazy, so that ``import kiln`` (and ``kiln --help``) imports neither torch nor ray.
    if name == "load_model":
        from kiln.models.predictor import load_predictor

        return load_predictor
    raise AttributeError(name)
