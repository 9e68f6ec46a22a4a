"""The Python predict API: load a saved or registered model and predict labels and probabilities.

A runtime (``kiln.models.inference_runtime``) turns normalized float32 inputs into logits; every
artifact format has one, so the same Predictor serves every model variant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiln.models.artifact import load_spec
from kiln.models.inference_runtime import Runtime, make_runtime
from kiln.models.inputs import to_raw
from kiln.models.probabilities import softmax
from kiln.models.spec import ModelSpec


class Predictor:
    """A loaded model: ``predict`` returns original label values, ``predict_proba`` class
    probabilities."""

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
        """Class probabilities (float32) for raw inputs."""
        probabilities: np.ndarray = softmax(self.logits(self.prepare(inputs))).astype(np.float32)
        return probabilities

    def close(self) -> None:
        """Release what the runtime holds beyond memory (an isolated runtime's process)."""
        close = getattr(self.runtime, "close", None)
        if close is not None:
            close()

    def predict(self, inputs: Any) -> list[Any]:
        idx = self.logits(self.prepare(inputs)).argmax(axis=1)
        return [self.spec.labels[i] for i in idx]


def load_predictor(model: str | Path, tracking_uri: str | None = None) -> Predictor:
    """Load from an artifact folder, a ``models:/NAME/VERSION`` / ``models:/NAME@ALIAS`` URI,
    a ``runs:/RUN_ID/model`` URI or a bare run id. Raises ModelError."""
    from kiln.tracking import resolve_model_dir

    directory = resolve_model_dir(str(model), tracking_uri)
    spec = load_spec(directory)
    return Predictor(spec, make_runtime(directory, spec), str(model))


def load_isolated_predictor(directory: str | Path, source: str) -> Predictor:
    """A predictor for the artifact in ``directory`` whose model runs in a child process
    (``kiln.models.isolated_runtime``): its crash fails its own calls only. ``source`` names it in
    errors. Raises ModelError (a builder not allowed, a load that failed in the child)."""
    from kiln.models.isolated_runtime import IsolatedRuntime

    spec = load_spec(directory)
    return Predictor(spec, IsolatedRuntime(Path(directory), spec, source), source)
