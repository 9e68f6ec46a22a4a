"""Kiln: train, tune, compress and serve PyTorch models on Ray."""

__version__ = "0.1.0"
