"""Production monitoring of served versions: drift against the training reference,
out-of-distribution inputs, alerts, status, reports and retraining.

Four subpackages, one per layer (arrows point down only):
- ``reference``: below training: a version's monitoring reference (written when it is
  registered) and the statistics it needs: the monitored features, OOD scoring, the drift tests;
- ``live``: the replica side (the ``serve.monitor`` config section, per-version monitors, alerts,
  metrics), used by the serving layer;
- ``console``: reading a served model's monitor over HTTP and writing reports (above serving);
- ``retrain``: the retraining loop, above cluster job submission and rollout control, handed to
  the replicas as a factory by the commands layer.

Nothing here imports ray or torch at package import time.
"""
