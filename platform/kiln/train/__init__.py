"""Training: the loop (plain function), checkpoints, metrics, and the Ray Train driver."""
