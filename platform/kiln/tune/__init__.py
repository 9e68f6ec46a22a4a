"""Tuning sweeps: Ray Tune + Optuna around the one training loop."""
