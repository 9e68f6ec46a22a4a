"""A model version that aborts its process on one input: the blast-radius test's candidate.

For tests and chaos scripts (``bench/``), never for serving real traffic:

```python
from crash_models import ALLOW, poison_image, register_crashing_candidate

# the operator allows the test-only builder, in the environment of `kiln serve start` (its replicas
# inherit it) and of the process that starts the rollout: KILN_ALLOWED_BUILDERS=crash_models
version = register_crashing_candidate(tracking_uri, run_dir, "models:/digits/1")
# ... kiln rollout start digits --to VERSION ...; then POST poison_image() to the model (OIP,
# UINT8): the process that runs that version calls os.abort() (SIGABRT).
```

``crashing_cnn`` is the built-in CNN (same weights, same state dict as the version it copies) with
one difference in eval mode: a batch holding the poison image (raw pixels: the first 255, every
other 0; after the model's per-channel normalization, a first value above all others and the rest
equal) aborts the process with ``os.abort()``, as an ONNX Runtime abort or a native crash would.
Every other input, the all-zero smoke request of a rollout included, is answered as by the base
version. This module must be importable by the replicas (``tests/`` on their ``PYTHONPATH``: the
test session's conftest puts it there) and allowed by the operator (``ALLOW``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kiln.models.builders import build_cnn

ALLOW = "crash_models"  # the KILN_ALLOWED_BUILDERS entry that allows this module's builder
ARCHITECTURE = "crash_models:crashing_cnn"


def poison_image(shape: tuple[int, ...] = (1, 8, 8)) -> np.ndarray:
    """The raw uint8 image ``[C, H, W]`` (digits: ``(1, 8, 8)``) that crashes the candidate: the
    first pixel 255, every other 0."""
    image = np.zeros(shape, dtype=np.uint8)
    image.flat[0] = 255
    return image


def is_poison(x: np.ndarray) -> bool:
    """Whether a normalized batch ``[N, C, H, W]`` holds the poison image (single channel)."""
    rows = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    rest = rows[:, 1:]
    return bool(((rows[:, 0] > rest.max(axis=1)) & (rest.max(axis=1) == rest.min(axis=1))).any())


def crashing_cnn(input_shape, num_classes, width: int = 32, dropout: float = 0.1):
    """The built-in CNN that aborts its process on the poison image (eval mode only)."""
    model = build_cnn(input_shape, num_classes, width=width, dropout=dropout)

    def abort_on_poison(module, args):
        if not module.training and is_poison(args[0].detach().cpu().numpy()):
            os.abort()

    model.register_forward_pre_hook(abort_on_poison)
    return model


def register_crashing_candidate(tracking_uri: str, run_dir: str | Path, base_uri: str) -> str:
    """Register ``base_uri``'s weights (``models:/NAME/VERSION``, a built-in CNN) under
    ``crashing_cnn`` as a new version of the same registered model, in ``tracking_uri`` (its
    artifacts under ``run_dir``'s store). Returns the new version number (``"3"``)."""
    # Imported here: replicas import this module for its builder only.
    from rollout_models import register_variant

    uri = register_variant(tracking_uri, Path(run_dir), base_uri, ARCHITECTURE)
    return uri.rsplit("/", 1)[1]
