"""Serving registered models over the Open Inference Protocol (KServe v2 REST) with Ray Serve.

Nothing here imports ray at package import time: ``kiln --help`` and config validation stay light.
"""
