"""The model spec: everything besides weights needed to rebuild and use a model, stored as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.data.preprocess import Preprocessing
from kiln.errors import ModelError
from kiln.files import atomic_write_text

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
        return atomic_write_text(Path(directory) / SPEC_FILE, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> ModelSpec:
        return cls.from_dict(json.loads((Path(directory) / SPEC_FILE).read_text()))


def load_spec(directory: str | Path, source: str | None = None) -> ModelSpec:
    """The spec of the artifact in ``directory``, without importing torch (the CLI, the serving plan
    and the rollout checks stay quick). ``source`` (a registry URI, say) names the artifact in
    errors; default: the folder. Raises ModelError when there is no spec or it is malformed."""
    directory = Path(directory)
    name = source or str(directory)
    if not (directory / SPEC_FILE).is_file():
        raise ModelError(f"{name} is not a Kiln model artifact (no {SPEC_FILE})")
    try:
        return ModelSpec.load(directory)
    except (ValueError, KeyError, TypeError) as exc:  # ValueError includes JSONDecodeError
        where = f"{source}: {SPEC_FILE}" if source else f"{directory}/{SPEC_FILE}"
        raise ModelError(f"{where} is malformed ({exc})") from None
