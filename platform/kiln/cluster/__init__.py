"""Kiln on a Ray cluster: job submission (Ray Jobs API), a local head, cluster-launcher configs, a
tracking server."""
