"""Production monitoring of served versions: drift against the training reference,
out-of-distribution inputs, alerts, status and reports.

Nothing here imports ray or torch at package import time.
"""
