"""Kiln's version: recorded as the code version of every run (lineage)."""

__version__ = "0.1.0"
