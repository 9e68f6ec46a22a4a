"""What is monitored per row: the features whose distribution is compared with the reference, and
the per-row OOD scores. Pure numpy: this runs on the request path.

Tabular models: every input feature (normalized model input; PSI and KS do not change under the
per-feature affine normalization) and the predicted class.
Image models: the model's output distribution (predicted class, confidence, each class's probability
when there are at most ``MAX_CLASS_FEATURES`` classes) plus two cheap input summaries (mean and
standard deviation of the normalized pixels). Outputs rather than penultimate-layer features because
every runtime (safetensors, ONNX, int8) yields logits but only the torch one exposes inner layers,
and the output distribution is what the served decisions are made of.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.models.probabilities import softmax

MAX_CLASS_FEATURES = 20
OOD_SCORES = ("energy", "msp")


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    kind: str  # "numeric" | "categorical"
    source: str  # "input" | "output"


def feature_layout(kind: str, feature_names: list[str], labels: list) -> list[FeatureSpec]:
    """The monitored features of a model, in the column order of ``row_features``."""
    if kind == "tabular":
        inputs = [FeatureSpec(str(n), "numeric", "input") for n in feature_names]
        return [*inputs, FeatureSpec("output.class", "categorical", "output")]
    out = [
        FeatureSpec("input.brightness", "numeric", "input"),
        FeatureSpec("input.contrast", "numeric", "input"),
        FeatureSpec("output.class", "categorical", "output"),
        FeatureSpec("output.confidence", "numeric", "output"),
    ]
    if len(labels) <= MAX_CLASS_FEATURES:
        out += [FeatureSpec(f"output.prob[{label}]", "numeric", "output") for label in labels]
    return out


def ood_scores(logits: np.ndarray, probs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-row in-distribution scores (higher = more like the training data): 'energy' is the
    negative free energy logsumexp(logits) (Liu et al. 2020), 'msp' the maximum softmax
    probability."""
    z = logits.astype(np.float64)
    top = z.max(axis=1)
    energy = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    probs = softmax(logits) if probs is None else probs
    return {"energy": energy, "msp": probs.max(axis=1)}


def input_features(kind: str, x: np.ndarray) -> np.ndarray:
    """Input-side columns of the monitored features, from normalized model input."""
    if kind == "tabular":
        return np.asarray(x, np.float32).reshape(len(x), -1)
    flat = np.asarray(x, np.float32).reshape(len(x), -1)
    mean = flat.mean(axis=1)
    std = np.sqrt(
        np.maximum((flat * flat).mean(axis=1) - mean * mean, 0.0)
    )  # np.std costs 3x on one row
    return np.stack([mean, std], axis=1)


def output_features(logits: np.ndarray, probs: np.ndarray, kind: str) -> np.ndarray:
    """Output-side columns of the monitored features."""
    cls = probs.argmax(axis=1).astype(np.float32)[:, None]
    if kind == "tabular":
        return cls
    cols = [cls, probs.max(axis=1)[:, None]]
    if probs.shape[1] <= MAX_CLASS_FEATURES:
        cols.append(probs)
    return np.concatenate(cols, axis=1).astype(np.float32)


def plotting_positions(n: int) -> np.ndarray:
    return (np.arange(n) + 0.5) / n


def tail_probability(
    sample: np.ndarray, values: np.ndarray, two_sided: bool, ranks: np.ndarray | None = None
) -> np.ndarray:
    """How typical each value is under a sorted reference sample: the share of reference values
    beyond it (lower tail; both tails doubled when ``two_sided``), floored at half a reference row,
    so values outside the reference's range get the smallest probability. ``ranks``:
    plotting_positions(len(sample))."""
    ranks = plotting_positions(len(sample)) if ranks is None else ranks
    cdf = np.interp(values, sample, ranks)  # clamps to [0.5/n, 1 - 0.5/n] outside the range
    if not two_sided:
        return cdf
    return np.minimum(1.0, 2.0 * np.minimum(cdf, 1.0 - cdf))


def ood_key(score: str, inputs: bool) -> str:
    return f"{score}+inputs" if inputs else score
