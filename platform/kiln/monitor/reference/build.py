"""The monitoring reference of a registered version: what its monitored features look like on the
training data, and its OOD scores on the validation split (for the threshold).

Computed when a version is registered (train, tune, compress) and stored in the artifact folder as
``monitor_reference.json`` beside ``spec.json``: compressed variants are other models, with their
own outputs and OOD threshold. Input features come from the train split (the training reference);
output features and OOD scores from the validation split, which the model has not been fitted on
(its outputs on training rows are over-confident).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.files import atomic_write_text
from kiln.models.probabilities import softmax
from kiln.monitor.reference.features import (
    OOD_SCORES,
    FeatureSpec,
    feature_layout,
    input_features,
    ood_key,
    ood_scores,
    output_features,
)
from kiln.monitor.reference.ood import OodScorer

REFERENCE_FILE = "monitor_reference.json"
SAMPLE_SIZE = 1000  # order statistics kept per numeric feature: a quantile sketch for KS and PSI
OOD_QUANTILES = np.linspace(0.0, 1.0, 1001)


@dataclass
class FeatureReference:
    name: str
    kind: str  # numeric | categorical
    source: str  # input | output
    sample: list[float] = field(default_factory=list)  # numeric: sorted order statistics
    proportions: list[float] = field(
        default_factory=list
    )  # categorical: share of each category 0..K-1

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(self.name, self.kind, self.source)


@dataclass
class MonitorReference:
    """Everything a served version's monitor compares live traffic with."""

    kind: str  # tabular | image
    labels: list[Any]
    features: list[FeatureReference]
    ood_quantiles: dict[
        str, list[float]
    ]  # output score -> its values at OOD_QUANTILES on the validation split
    typicality_quantiles: dict[
        str, list[float]
    ]  # ood_key -> validation rows' OOD scores at OOD_QUANTILES
    rows: dict[str, int]  # rows behind the input and output references
    dataset_hash: str = ""

    def scorer(self, score: str, inputs: bool) -> OodScorer:
        samples = [f.sample for f in self.features if f.source == "input"] if inputs else None
        return OodScorer(self.ood_quantiles[score], samples)

    def threshold(self, score: str, inputs: bool, pass_rate: float) -> float:
        """The OOD threshold that ``pass_rate`` of the validation rows reach (a row below it is
        OOD)."""
        return float(
            np.interp(
                1.0 - pass_rate, OOD_QUANTILES, self.typicality_quantiles[ood_key(score, inputs)]
            )
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MonitorReference:
        data = dict(data)
        data["features"] = [FeatureReference(**f) for f in data["features"]]
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        """Store the reference in an artifact folder (atomically); returns its path."""
        return atomic_write_text(
            Path(directory) / REFERENCE_FILE, json.dumps(self.to_dict(), separators=(",", ":"))
        )


def load_reference(directory: str | Path) -> MonitorReference | None:
    """The reference stored in an artifact folder, or None when the version was registered without
    one."""
    path = Path(directory) / REFERENCE_FILE
    if not path.is_file():
        return None
    return MonitorReference.from_dict(json.loads(path.read_text()))


def _sketch(values: np.ndarray) -> list[float]:
    values = np.sort(np.asarray(values, np.float64))
    if len(values) > SAMPLE_SIZE:
        values = values[np.linspace(0, len(values) - 1, SAMPLE_SIZE).round().astype(int)]
    # float32 values exactly, as the window holds them: rounding would split ties of discrete
    # features
    return [float(v) for v in values.astype(np.float32)]


def build_reference(predictor, data) -> MonitorReference:
    """The reference of ``predictor`` (a kiln Predictor) on ``data`` (PreparedData: normalized
    splits). Raises ValueError when the data has no training rows."""
    if len(data.x_train) == 0:
        raise ValueError("no training rows to build a monitoring reference from")
    spec = predictor.spec
    kind = spec.preprocessing.kind
    layout = feature_layout(kind, list(spec.preprocessing.feature_names), list(spec.labels))
    # Validation rows stand for unseen in-distribution traffic; without a validation split, the test
    # split.
    x_out = data.x_val if len(data.x_val) else data.x_test if len(data.x_test) else data.x_train
    logits = predictor.logits(x_out)
    probs = softmax(logits)
    inputs = input_features(kind, data.x_train)
    outputs = output_features(logits, probs, kind)
    features = []
    n_in = inputs.shape[1]
    for i, f in enumerate(layout):
        column = inputs[:, i] if f.source == "input" else outputs[:, i - n_in]
        if f.kind == "categorical":
            counts = np.bincount(column.astype(int), minlength=len(spec.labels)).astype(np.float64)
            features.append(
                FeatureReference(
                    f.name, f.kind, f.source, proportions=(counts / counts.sum()).round(6).tolist()
                )
            )
        else:
            present = column[~np.isnan(column)]
            features.append(FeatureReference(f.name, f.kind, f.source, sample=_sketch(present)))
    scores = ood_scores(logits, probs)
    quantiles = {name: _rounded(np.quantile(scores[name], OOD_QUANTILES)) for name in OOD_SCORES}
    reference = MonitorReference(
        kind=kind,
        labels=[str(label) for label in spec.labels],
        features=features,
        ood_quantiles=quantiles,
        typicality_quantiles={},
        rows={"input": int(len(data.x_train)), "output": int(len(x_out))},
        dataset_hash=getattr(data, "dataset_hash", ""),
    )
    # Calibration: the validation rows' own OOD scores, for every score kind, with and without
    # inputs.
    val_inputs = input_features(kind, x_out)
    for name in OOD_SCORES:
        for with_inputs in (False, True):
            typical = reference.scorer(name, with_inputs).score(scores[name], val_inputs)
            reference.typicality_quantiles[ood_key(name, with_inputs)] = _rounded(
                np.quantile(typical, OOD_QUANTILES)
            )
    return reference


def _rounded(values: np.ndarray) -> list[float]:
    return [float(f"{v:.6g}") for v in values]


def write_reference(model_dir: str | Path, data) -> Path:
    """Build the reference of the artifact in ``model_dir`` on ``data`` and store it there; returns
    its path."""
    from kiln.models.predictor import load_predictor

    return build_reference(load_predictor(Path(model_dir)), data).save(model_dir)
