"""Retraining automation: when drift lasts, submit a training job and roll out the version it
registers. Above cluster job submission and rollout control; the commands layer hands
``loop.RetrainLoop`` to the serving replicas as their retrainer factory."""
