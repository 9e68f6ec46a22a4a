"""The Python predict API: load a saved or registered model and predict labels and probabilities.

A runtime turns normalized float32 inputs into logits; each artifact format has one. Formats
added by later steps (ONNX, ...) register theirs with ``register_runtime``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from kiln.errors import ModelError
from kiln.models.artifact import load_spec, load_torch_model
from kiln.models.inputs import to_raw
from kiln.models.spec import ModelSpec

Runtime = Callable[[np.ndarray], np.ndarray]
_RUNTIMES: dict[str, Callable[[Path, ModelSpec], Runtime]] = {}


def register_runtime(fmt: str, factory: Callable[[Path, ModelSpec], Runtime]) -> None:
    """Register how artifacts of ``fmt`` are run: ``factory(directory, spec) -> logits_fn``."""
    _RUNTIMES[fmt] = factory


def _torch_runtime(directory: Path, spec: ModelSpec) -> Runtime:
    import torch

    model, _ = load_torch_model(directory)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(x))).float().numpy()

    return run


register_runtime("safetensors", _torch_runtime)


class Predictor:
    """A loaded model: ``predict`` returns original label values, ``predict_proba`` class probabilities."""

    def __init__(self, spec: ModelSpec, runtime: Runtime, source: str):
        self.spec = spec
        self.runtime = runtime
        self.source = source

    @property
    def labels(self) -> list[Any]:
        return list(self.spec.labels)

    def prepare(self, inputs: Any) -> np.ndarray:
        """Raw inputs -> normalized float32 model input (same preprocessing as training)."""
        return self.spec.preprocessing.apply(to_raw(self.spec.preprocessing, inputs))

    def logits(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Logits for already-prepared inputs, in batches."""
        outs = [self.runtime(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return np.concatenate(outs) if outs else np.zeros((0, self.spec.num_classes), np.float32)

    def predict_proba(self, inputs: Any) -> np.ndarray:
        z = self.logits(self.prepare(inputs)).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict(self, inputs: Any) -> list[Any]:
        idx = self.logits(self.prepare(inputs)).argmax(axis=1)
        return [self.spec.labels[i] for i in idx]


def load_predictor(model: str | Path, tracking_uri: str | None = None) -> Predictor:
    """Load from an artifact folder, a ``models:/NAME/VERSION`` / ``models:/NAME@ALIAS`` URI,
    a ``runs:/RUN_ID/model`` URI or a bare run id. Raises ModelError."""
    from kiln.tracking import resolve_model_dir

    directory = resolve_model_dir(str(model), tracking_uri)
    spec = load_spec(directory)
    factory = _RUNTIMES.get(spec.format)
    if factory is None:
        raise ModelError(f"no runtime for model format '{spec.format}' (known: {', '.join(sorted(_RUNTIMES))})")
    return Predictor(spec, factory(directory, spec), str(model))
