"""Monitoring inside a serving replica: the ``serve.monitor`` config section, one monitor per served
version, its window, alerts and metrics. Retraining is not imported here: the layer above hands
the replicas a retrainer factory."""
