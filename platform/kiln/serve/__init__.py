"""Serving registered models over the Open Inference Protocol (KServe v2 REST) with Ray Serve.

Nothing here imports ray at package import time: ``kiln --help`` and config validation stay light.
"""

# kiln.config imports kiln.serve.config, which needs kiln.config's Section: import kiln.config first
# so that either import order works.
import kiln.config  # noqa: E402,F401
