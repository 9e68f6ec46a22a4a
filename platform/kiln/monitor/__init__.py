"""Production monitoring of served versions: drift against the training reference, out-of-distribution
inputs, alerts, status and reports.

Nothing here imports ray or torch at package import time.
"""

# kiln.config imports kiln.serve.config, which imports kiln.monitor.config, which needs kiln.config's
# Section: import kiln.config first so that either import order works.
import kiln.config  # noqa: E402,F401
