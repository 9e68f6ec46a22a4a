"""One served model version: what its inputs and outputs look like over the protocol, and how
request tensors and convenience JSON become model inputs. No Ray here, so it is tested in-process.

Inputs are raw (pixels or feature values, as in the training data); the model's own preprocessing
is applied here, exactly as ``Predictor.predict_proba`` does it in-process.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.models.predictor import Predictor
from kiln.serve.limits import LimitsConfig, check_image, check_rows, check_string, over
from kiln.serve.protocol import ProtocolError, Tensor

INPUT_NAME = "input"
PROBABILITIES = "probabilities"
LABEL = "label"
INTEGER_TYPES = {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
TABULAR_TYPES = INTEGER_TYPES | {"FP16", "FP32", "FP64", "BOOL"}


@dataclass
class ServedVersion:
    """A loaded version of a served model (``predictor`` runs any artifact format through its
    runtime)."""

    model_name: str
    version: str
    predictor: Predictor
    # serve.limits: budgets checked before any work
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    @property
    def kind(self) -> str:
        return self.predictor.spec.preprocessing.kind

    @property
    def platform(self) -> str:
        return f"kiln_{self.predictor.spec.format}"

    def input_metadata(self) -> dict[str, Any]:
        prep = self.predictor.spec.preprocessing
        if self.kind == "image":
            return {"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, *prep.input_shape]}
        return {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, len(prep.feature_names)]}

    def output_metadata(self) -> list[dict[str, Any]]:
        return [
            {
                "name": PROBABILITIES,
                "datatype": "FP32",
                "shape": [-1, self.predictor.spec.num_classes],
            },
            {"name": LABEL, "datatype": "BYTES", "shape": [-1]},
        ]

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        """Model metadata (OIP), with the labels, features and artifact format under
        ``parameters``."""
        spec = self.predictor.spec
        params: dict[str, Any] = {
            "labels": [str(label) for label in spec.labels],
            "format": spec.format,
            "architecture": spec.architecture,
            "kind": self.kind,
        }
        if self.kind == "tabular":
            params["feature_names"] = list(spec.preprocessing.feature_names)
        if spec.variant:
            params["variant"] = spec.variant
        return {
            "name": self.model_name,
            "versions": versions,
            "platform": self.platform,
            "inputs": [self.input_metadata()],
            "outputs": self.output_metadata(),
            "parameters": params,
        }

    # --- request -> normalized model input -------------------------------------------------

    def prepare_tensors(self, inputs: list[Tensor]) -> np.ndarray:
        """Normalized float32 model input from OIP input tensors. Raises ProtocolError (400)."""
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            names = ", ".join(repr(t.name) for t in inputs)
            raise ProtocolError(
                f"model '{self.model_name}' takes one input named '{INPUT_NAME}', got {names}"
            )
        tensor = inputs[0]
        shape = list(tensor.shape)
        if not shape or shape[0] == 0:
            raise ProtocolError(f"input '{INPUT_NAME}': shape {shape} holds no rows")
        if self.kind == "image":
            return self._image_tensor(tensor)
        if tensor.datatype not in TABULAR_TYPES:
            raise ProtocolError(
                f"input '{INPUT_NAME}': datatype {tensor.datatype} is not accepted by tabular "
                "model "
                f"'{self.model_name}' (send FP32)"
            )
        features = len(self.predictor.spec.preprocessing.feature_names)
        if len(shape) != 2 or shape[1] != features:
            raise ProtocolError(
                f"input '{INPUT_NAME}': shape {shape} does not match [-1, {features}]"
            )
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused below
            values = tensor.data.astype(np.float32)
        if not np.isfinite(values).all():
            raise ProtocolError(
                f"input '{INPUT_NAME}': values are NaN, Infinity or outside the range of FP32"
            )
        return self._prepare(values)

    def _image_tensor(self, tensor: Tensor) -> np.ndarray:
        prep = self.predictor.spec.preprocessing
        expected = [-1, *prep.input_shape]
        if tensor.datatype == "BYTES":
            if len(tensor.shape) != 1:
                raise ProtocolError(
                    f"input '{INPUT_NAME}': BYTES images need shape [N], got {list(tensor.shape)}"
                )
            # Encoded files: raw bytes (binary tensor data), or base64 text (JSON has no bytes);
            # each header is read (format, pixels) before any image is decoded.
            files = [_maybe_b64(item) for item in tensor.data]
            for i, data in enumerate(files):
                check_image(data, self.limits, f"input '{INPUT_NAME}' element {i}")
            return self._prepare(files)
        if tensor.datatype != "UINT8":
            raise ProtocolError(
                f"input '{INPUT_NAME}': datatype {tensor.datatype} is not accepted by image model "
                f"'{self.model_name}' (send UINT8 pixels of shape {expected}, or BYTES PNG/JPEG)"
            )
        channels, height, width = prep.input_shape
        layouts = [[channels, height, width], [height, width, channels]] + (
            [[height, width]] if channels == 1 else []
        )
        if list(tensor.shape[1:]) not in layouts:
            raise ProtocolError(
                f"input '{INPUT_NAME}': shape {list(tensor.shape)} does not match {expected} "
                f"(or [-1, {height}, {width}, {channels}])"
            )
        return self._prepare(tensor.data)

    def prepare_json(self, payload: Any) -> np.ndarray:
        """Normalized model input from the convenience body: {"images": [base64, ...]} or
        {"records": [...]}."""
        if not isinstance(payload, dict):
            raise ProtocolError(f"request body must be a JSON object, not {type(payload).__name__}")
        if self.kind == "image":
            images = payload.get("images")
            if images is None:
                raise ProtocolError(
                    f"missing field 'images' (image model '{self.model_name}' takes a list of "
                    "base64 PNG/JPEG strings)"
                )
            if (
                not isinstance(images, list)
                or not images
                or not all(isinstance(i, str) for i in images)
            ):
                raise ProtocolError("field 'images' must be a non-empty list of base64 strings")
            check_rows(len(images), self.limits, "field 'images'")
            files = []
            for i, item in enumerate(images):
                check_string(len(item), self.limits, f"images[{i}]")
                files.append(_b64decode(item, i))
                check_image(files[-1], self.limits, f"images[{i}]")
            return self._prepare(files)
        records = payload.get("records")
        if records is None:
            raise ProtocolError(
                f"missing field 'records' (tabular model '{self.model_name}' takes a list of "
                "objects "
                f"with the features {', '.join(self.predictor.spec.preprocessing.feature_names)})"
            )
        if (
            not isinstance(records, list)
            or not records
            or not all(isinstance(r, dict) for r in records)
        ):
            raise ProtocolError("field 'records' must be a non-empty list of objects")
        return self._prepare(self._records_matrix(records))

    def _records_matrix(self, records: list[dict[str, Any]]) -> np.ndarray:
        """[N, F] float64 of the model's features only (other keys are never looked at: the work is
        records x features, whatever keys a client sends); null is NaN (preprocessing fills it)."""
        limits = self.limits
        check_rows(len(records), limits, "field 'records'")
        names = self.predictor.spec.preprocessing.feature_names
        out = np.empty((len(records), len(names)), dtype=np.float64)
        for i, record in enumerate(records):
            if len(record) > limits.max_record_keys:
                raise over(
                    f"records[{i}]: keys", len(record), limits.max_record_keys, "max_record_keys"
                )
            missing = [n for n in names if n not in record]
            if missing:
                raise ProtocolError(f"records[{i}]: missing feature columns: {', '.join(missing)}")
            for j, name in enumerate(names):
                value = record[name]
                if value is None:
                    out[i, j] = np.nan
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[i, j] = float(value) if abs(value) < 3.4e38 else np.inf
                else:
                    raise ProtocolError(
                        f"records[{i}]: feature '{name}' must be a number or null, got "
                        f"{type(value).__name__}"
                    )
        if np.isinf(out).any():
            raise ProtocolError("records: values outside the range of FP32")
        return out

    def _prepare(self, raw: Any) -> np.ndarray:
        try:
            return self.predictor.prepare(raw)
        except KilnError as exc:  # InputError: undecodable image, missing columns, non-numbers
            raise ProtocolError(str(exc)) from None

    # --- logits -> outputs ----------------------------------------------------------------

    def output_tensors(self, probs: np.ndarray) -> list[Tensor]:
        """The OIP outputs of a request from its class probabilities (``softmax(logits)``, computed
        once per request): probabilities (FP32) and the predicted label (BYTES)."""
        probs = probs.astype(np.float32)
        labels = self.predictor.spec.labels
        names = np.empty(len(probs), dtype=object)
        names[:] = [str(labels[i]).encode() for i in probs.argmax(axis=1)]
        return [
            Tensor(PROBABILITIES, "FP32", list(probs.shape), probs),
            Tensor(LABEL, "BYTES", [len(probs)], names),
        ]

    def predictions(self, probs: np.ndarray) -> list[dict[str, Any]]:
        """Convenience output from the class probabilities: the original label and a {label:
        probability} map per row."""
        probs = probs.astype(np.float32)
        labels = self.predictor.spec.labels
        keys = [str(label) for label in labels]
        return [
            {
                "label": labels[int(row.argmax())],
                "probabilities": dict(zip(keys, map(float, row), strict=True)),
            }
            for row in probs
        ]


def _maybe_b64(item: bytes) -> bytes:
    """Base64 text decoded; anything else (PNG and JPEG bytes are never valid base64) as it is."""
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        return item


def _b64decode(item: str, index: int) -> bytes:
    if item.startswith("data:") and "," in item:  # a data URL: data:image/png;base64,....
        item = item.split(",", 1)[1]
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"images[{index}] is not valid base64") from None
