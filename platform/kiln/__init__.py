"""Kiln: train, tune, compress and serve PyTorch models on Ray."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that ``import kiln`` (and ``kiln --help``) imports neither torch nor ray.
    if name == "load_model":
        from kiln.models.predictor import load_predictor

        return load_predictor
    raise AttributeError(name)
