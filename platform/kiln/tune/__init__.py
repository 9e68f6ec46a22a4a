"""Tuning sweeps: Ray Tune + Optuna around the one training loop.

``kiln.config`` imports ``kiln.tune.config`` (the ``tune:`` section), which subclasses
``kiln.config.Section``; importing ``kiln.config`` first keeps that order acyclic whichever
module a caller imports first.
"""

import kiln.config  # noqa: F401
