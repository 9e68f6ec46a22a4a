"""Post-training compression: pruning, quantization, distillation, one evaluation harness, a report.

``kiln.config`` is imported first: it imports ``kiln.compress.config`` for its ``compress`` section,
whose classes subclass ``kiln.config.Section``.
"""

import kiln.config  # noqa: F401
