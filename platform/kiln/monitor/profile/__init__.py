"""Monitoring statistics below training: the monitored features of a row, OOD scoring, the
monitoring reference a version is registered with, and the drift tests. numpy and scipy only."""
