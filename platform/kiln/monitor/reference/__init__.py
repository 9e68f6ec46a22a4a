"""A registered version's monitoring reference and the statistics it needs, below training: the
monitored features of a row (``features``), OOD scoring (``ood``), the reference itself
(``build``: built when a version is registered by train, tune and compress, stored beside its
spec) and the drift tests serving runs against it (``stats``). numpy and scipy only.

The reference's API is exported here: ``write_reference(model_dir, data)`` (what registration
calls), ``load_reference``, ``build_reference``, ``MonitorReference``, ``FeatureReference``,
``REFERENCE_FILE``.
"""

from kiln.monitor.reference.build import (
    REFERENCE_FILE,
    FeatureReference,
    MonitorReference,
    build_reference,
    load_reference,
    write_reference,
)

__all__ = [
    "REFERENCE_FILE",
    "FeatureReference",
    "MonitorReference",
    "build_reference",
    "load_reference",
    "write_reference",
]
