"""The model spec: everything besides weights needed to rebuild and use a model, stored as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.data.preprocess import Preprocessing

SPEC_FILE = "spec.json"


@dataclass
class ModelSpec:
    """Architecture + builder kwargs + input preprocessing + label mapping + weight format.

    ``format`` says how the weights are stored: "safetensors" (state dict for the built
    architecture); later steps add formats that execute nothing on load (e.g. ONNX).
    ``files`` lists the artifact's files (all of them count toward its size).
    """

    architecture: str
    kwargs: dict[str, Any]
    input_shape: list[int]
    labels: list[Any]
    preprocessing: Preprocessing
    format: str = "safetensors"
    files: list[str] = field(default_factory=lambda: ["model.safetensors"])
    variant: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preprocessing"] = self.preprocessing.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        data = dict(data)
        data["preprocessing"] = Preprocessing.from_dict(data["preprocessing"])
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SPEC_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ModelSpec:
        return cls.from_dict(json.loads((Path(directory) / SPEC_FILE).read_text()))
