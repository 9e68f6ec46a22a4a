"""Runtimes: how an artifact of each format turns normalized float32 inputs into logits.

One factory per ``ModelSpec.format``; ``factory(directory, spec) -> fn(x: ndarray) -> logits``.
Formats that later steps produce (ONNX, ...) add their factory here, so every consumer
(predict API, serving, batch inference, evaluation) runs every variant the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from kiln.errors import ModelError
from kiln.models.spec import ModelSpec

Runtime = Callable[[np.ndarray], np.ndarray]
RuntimeFactory = Callable[[Path, ModelSpec], Runtime]


def torch_runtime(directory: Path, spec: ModelSpec) -> Runtime:
    import torch

    from kiln.models.artifact import load_torch_model

    model, _ = load_torch_model(directory)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits: np.ndarray = model(torch.from_numpy(np.ascontiguousarray(x))).float().numpy()
        return logits

    return run


def onnx_runtime(directory: Path, spec: ModelSpec) -> Runtime:
    from kiln.models.onnx_artifact import onnx_runtime as factory

    return factory(directory, spec)


RUNTIMES: dict[str, RuntimeFactory] = {
    "safetensors": torch_runtime,
    "onnx": onnx_runtime,  # fp32 exports and int8 (QDQ / dynamic) quantized variants alike
}


def make_runtime(directory: Path, spec: ModelSpec) -> Runtime:
    """The runtime for ``spec.format``. Raises ModelError for an unknown format."""
    factory = RUNTIMES.get(spec.format)
    if factory is None:
        raise ModelError(
            f"no runtime for model format '{spec.format}' (known: {', '.join(sorted(RUNTIMES))})"
        )
    return factory(Path(directory), spec)
