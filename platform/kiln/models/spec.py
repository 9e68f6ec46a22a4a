"""The model spec: everything besides weights needed to rebuild and use a model, stored as JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kiln.data.preprocess import Preprocessing
from kiln.errors import ModelError
from kiln.files import atomic_write_text
from kiln.models.registry import artifact_builder_target

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
        """A spec from its JSON form, every field checked by type and range (a spec is read from
        artifacts anyone who can register a version wrote). Raises ValueError, KeyError or
        TypeError naming the field."""
        if not isinstance(data, dict):
            raise TypeError(f"a spec is a JSON object, not {type(data).__name__}")
        data = dict(data)
        _check_fields(data)
        data["preprocessing"] = Preprocessing.from_dict(data["preprocessing"])
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        return atomic_write_text(Path(directory) / SPEC_FILE, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> ModelSpec:
        return cls.from_dict(json.loads((Path(directory) / SPEC_FILE).read_text()))


# Bounds of what a spec may describe: far above any model Kiln trains, far below what would exhaust
# a process before a weight is read.
MAX_INPUT_DIMS = 3
MAX_INPUT_SIDE = 1 << 15
MAX_INPUT_ELEMENTS = 1 << 26
MAX_LABELS = 1 << 16
MAX_FILES = 16


def _check_fields(data: dict[str, Any]) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ValueError(f"'{key}' must be {what}, got {data.get(key)!r:.80}")

    known = {f.name for f in fields(ModelSpec)}
    extra = sorted(set(data) - known)
    if extra:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, extra))}")
    need(
        isinstance(data.get("architecture"), str) and bool(data["architecture"]),
        "architecture",
        "a builder name",
    )
    need(isinstance(data.get("kwargs"), dict), "kwargs", "an object")
    shape = data.get("input_shape")
    need(
        isinstance(shape, list)
        and 1 <= len(shape) <= MAX_INPUT_DIMS
        and all(type(d) is int and 1 <= d <= MAX_INPUT_SIDE for d in shape)
        and math.prod(shape) <= MAX_INPUT_ELEMENTS,
        "input_shape",
        f"1 to {MAX_INPUT_DIMS} positive sizes (each <= {MAX_INPUT_SIDE}, product <= "
        f"{MAX_INPUT_ELEMENTS})",
    )
    labels = data.get("labels")
    need(
        isinstance(labels, list)
        and 1 <= len(labels) <= MAX_LABELS
        and all(isinstance(v, (str, int, float, bool)) for v in labels),
        "labels",
        f"a list of 1 to {MAX_LABELS} scalar labels",
    )
    need(isinstance(data.get("preprocessing"), dict), "preprocessing", "an object")
    need(isinstance(data.get("format", ""), str), "format", "a string")
    files = data.get("files", [])
    need(
        isinstance(files, list)
        and len(files) <= MAX_FILES
        and all(isinstance(f, str) and _plain_file_name(f) for f in files),
        "files",
        f"a list of at most {MAX_FILES} plain file names (no folders)",
    )
    need(isinstance(data.get("variant", {}), dict), "variant", "an object")


def _plain_file_name(name: str) -> bool:
    """A file directly in the artifact folder: no separator, no '..', not hidden."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


# Formats whose runtime builds the spec's architecture (ONNX runs a graph, no builder is called).
BUILT_FORMATS = ("safetensors",)


def check_allowed_builder(spec: ModelSpec, source: str) -> None:
    """ModelError (naming ``source`` and how to allow it) when loading the artifact would call a
    builder that is not allowed (``kiln.models.registry.artifact_builder_target``); imports
    nothing."""
    if spec.format in BUILT_FORMATS:
        try:
            artifact_builder_target(spec.architecture)
        except ModelError as exc:
            raise ModelError(f"{source}: {exc}") from None


def load_spec(directory: str | Path, source: str | None = None) -> ModelSpec:
    """The spec of the artifact in ``directory``, without importing torch (the CLI, the serving plan
    and the rollout checks stay quick). ``source`` (a registry URI, say) names the artifact in
    errors; default: the folder. Raises ModelError when there is no spec or it is malformed."""
    directory = Path(directory)
    name = source or str(directory)
    if not (directory / SPEC_FILE).is_file():
        raise ModelError(f"{name} is not a Kiln model artifact (no {SPEC_FILE})")
    try:
        spec = ModelSpec.load(directory)
    except RecursionError:  # JSON nested deeper than the parser's stack
        raise ModelError(f"{name}: {SPEC_FILE} is nested too deeply") from None
    except (ValueError, KeyError, TypeError) as exc:  # ValueError includes JSONDecodeError
        where = f"{source}: {SPEC_FILE}" if source else f"{directory}/{SPEC_FILE}"
        raise ModelError(f"{where} is malformed ({exc})") from None
    return spec
