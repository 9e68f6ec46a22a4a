"""The Open Inference Protocol (KServe v2 REST) request and response bodies, with Triton's binary
extension.

A request body is JSON, or (binary tensor data extension, what tritonclient sends by default) a JSON
header of ``Inference-Header-Content-Length`` bytes followed by the raw tensors in input order. A
response is encoded the same way: JSON data for outputs asked for as JSON, raw bytes for the others.
Everything a client can get wrong raises ``ProtocolError`` with the HTTP status to answer with.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.serve.limits import (
    LimitError,
    LimitsConfig,
    check_rows,
    check_shape,
    check_string,
    parse_json,
)

HEADER_LENGTH = "inference-header-content-length"

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}


class ProtocolError(KilnError):
    """A request the server answers with a 4xx status and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# Everything a client can get wrong: a malformed request, or one over a serve.limits budget. Both
# carry the 4xx status to answer with.
CLIENT_ERRORS = (ProtocolError, LimitError)
DEFAULT_LIMITS = LimitsConfig()
MAX_ID_CHARS = 256


@dataclass
class Tensor:
    """A named tensor: ``data`` is an ndarray of ``shape`` (dtype object holding bytes for
    BYTES)."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: the request's default


@dataclass
class InferRequest:
    inputs: list[Tensor]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None  # None: every output
    binary_output: bool = False  # default for outputs that do not say
    parameters: dict[str, Any] = field(default_factory=dict)


def load_json(
    body: bytes, what: str = "request body", limits: LimitsConfig = DEFAULT_LIMITS
) -> Any:
    """Parse strict JSON within ``limits`` (depth checked before parsing, number literals by
    length; NaN and Infinity refused). ProtocolError (400) naming the problem when it is not
    strict JSON, LimitError (413) over a budget."""
    if not body:
        raise ProtocolError(f"{what} is empty; send a JSON object")
    try:
        return parse_json(body, limits)
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(
            f"{what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except ValueError as exc:  # a refused constant or out-of-range float (LimitError is not one)
        raise ProtocolError(f"{what} is not valid JSON ({exc})") from None
    except RecursionError:  # the depth check keeps bodies far from this; never a 500 regardless
        raise LimitError(f"{what} nests too deeply (serve.limits.max_json_depth)") from None


def parse_infer_request(
    body: bytes, header_length: str | None = None, limits: LimitsConfig = DEFAULT_LIMITS
) -> InferRequest:
    """An ``InferRequest`` from a body (and the ``Inference-Header-Content-Length`` header, if
    any), every size checked against ``limits`` before it is used. Raises ProtocolError or
    LimitError."""
    binary = b""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise ProtocolError(
                f"Inference-Header-Content-Length '{header_length}' is not an integer"
            ) from None
        if not 0 < size <= len(body):
            raise ProtocolError(
                f"Inference-Header-Content-Length {size} does not fit a body of {len(body)} bytes"
            )
        body, binary = body[:size], body[size:]
    payload = load_json(body, limits=limits)
    if not isinstance(payload, dict):
        raise ProtocolError(f"request body must be a JSON object, not {type(payload).__name__}")
    raw_inputs = payload.get("inputs")
    if raw_inputs is None:
        raise ProtocolError("missing field 'inputs' (a list of {name, shape, datatype, data})")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("field 'inputs' must be a non-empty list")
    params = payload.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("field 'parameters' must be an object")
    check_rows(len(raw_inputs), limits, "field 'inputs'")
    inputs, offset = [], 0
    for i, raw in enumerate(raw_inputs):
        tensor, used = _parse_input(raw, i, binary, offset, limits)
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise ProtocolError(
            f"binary data holds {len(binary)} bytes but the inputs' binary_data_size add up to "
            f"{offset}"
        )
    request_id = payload.get("id")
    if request_id is not None and (
        not isinstance(request_id, str) or len(request_id) > MAX_ID_CHARS
    ):
        raise ProtocolError(f"field 'id' must be a string of at most {MAX_ID_CHARS} characters")
    return InferRequest(
        inputs=inputs,
        id=request_id,
        outputs=_parse_outputs(payload.get("outputs")),
        binary_output=bool(params.get("binary_data_output")),
        parameters=params,
    )


def _parse_input(
    raw: Any, index: int, binary: bytes, offset: int, limits: LimitsConfig
) -> tuple[Tensor, int]:
    where = f"inputs[{index}]"
    if not isinstance(raw, dict):
        raise ProtocolError(f"{where} must be an object with name, shape, datatype and data")
    for key in ("name", "shape", "datatype"):
        if key not in raw:
            raise ProtocolError(f"{where}: missing field '{key}'")
    params = raw.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is None:
        if "data" not in raw:
            # the header's fields are checked first: a bad name, shape or datatype names itself
            check_tensor_header(raw["name"], raw["shape"], raw["datatype"], where, limits)
            raise ProtocolError(
                f"input '{raw['name']}': missing field 'data' (or parameters.binary_data_size "
                "with binary data)"
            )
        return decode_tensor(
            raw["name"], raw["shape"], raw["datatype"], limits, data=raw["data"], where=where
        ), 0
    if not isinstance(size, int) or size < 0 or offset + size > len(binary):
        check_tensor_header(raw["name"], raw["shape"], raw["datatype"], where, limits)
        raise ProtocolError(
            f"input '{raw['name']}': binary_data_size {size!r} does not fit the "
            f"{len(binary) - offset} bytes of binary data left"
        )
    chunk = binary[offset : offset + size]
    return decode_tensor(
        raw["name"], raw["shape"], raw["datatype"], limits, raw=chunk, where=where
    ), size


def check_tensor_header(
    name: Any, shape: Any, datatype: Any, where: str, limits: LimitsConfig
) -> int:
    """The element count of an input tensor's ``shape``, after checking its name, shape and
    datatype and the shape against ``limits`` (before anything is sized by it). Raises
    ProtocolError or LimitError."""
    if not isinstance(name, str):
        raise ProtocolError(f"{where}: 'name' must be a string")
    where = f"input '{name}'"
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError(
            f"{where}: 'shape' must be a list of non-negative integers, got {shape!r}"
        )
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise ProtocolError(
            f"{where}: unknown datatype {datatype!r:.40} (one of {', '.join(DATATYPES)})"
        )
    return check_shape(shape, limits, where)


def decode_tensor(
    name: Any,
    shape: Any,
    datatype: Any,
    limits: LimitsConfig,
    *,
    raw: bytes | None = None,
    data: Any = None,
    where: str = "input",
) -> Tensor:
    """One input tensor, from its raw little-endian bytes (the binary extension over REST,
    ``raw_input_contents`` over gRPC; BYTES elements each prefixed by a 4-byte length) or from
    ``data`` (the JSON ``data`` over REST, the typed ``contents`` over gRPC). The one decoder of
    both protocols: every check is the same. Raises ProtocolError or LimitError."""
    count = check_tensor_header(name, shape, datatype, where, limits)
    where = f"input '{name}'"
    if raw is not None:
        return Tensor(
            name, datatype, shape, _from_binary(raw, datatype, shape, count, where, limits)
        )
    return Tensor(name, datatype, shape, _from_json(data, datatype, shape, count, where, limits))


def _from_binary(
    chunk: bytes, datatype: str, shape: list[int], count: int, where: str, limits: LimitsConfig
) -> np.ndarray:
    if datatype == "BYTES":
        items: list[bytes] = []
        pos = 0
        while pos < len(chunk):
            if pos + 4 > len(chunk):
                raise ProtocolError(f"{where}: BYTES binary data is truncated")
            (length,) = struct.unpack_from("<I", chunk, pos)
            check_string(length, limits, f"{where}: element {len(items)}")
            if len(items) >= count:
                raise ProtocolError(f"{where}: BYTES binary data holds more than {count} elements")
            items.append(chunk[pos + 4 : pos + 4 + length])
            pos += 4 + length
        if pos != len(chunk) or len(items) != count:
            raise ProtocolError(
                f"{where}: BYTES binary data holds {len(items)} elements, shape {shape} needs "
                f"{count}"
            )
        return _object_array(items, shape)
    dtype = DATATYPES[datatype]
    if len(chunk) != count * dtype.itemsize:
        raise ProtocolError(
            f"{where}: {len(chunk)} bytes of binary data, but shape {shape} of {datatype} "
            f"needs {count * dtype.itemsize}"
        )
    arr = np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
    _check_finite(arr, datatype, where)
    return arr.reshape(shape)


def _from_json(
    data: Any, datatype: str, shape: list[int], count: int, where: str, limits: LimitsConfig
) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        flat = _flatten(data)
        if any(not isinstance(v, str) for v in flat):
            raise ProtocolError(f"{where}: BYTES data must be strings")
        for i, v in enumerate(flat):
            check_string(len(v), limits, f"{where}: element {i}")
        if len(flat) != count:
            raise ProtocolError(f"{where}: {len(flat)} values, but shape {shape} needs {count}")
        return _object_array([v.encode() for v in flat], shape)
    try:
        arr = np.asarray(data)
    except ValueError:
        raise ProtocolError(
            f"{where}: 'data' is a ragged nested list; send it flat, in row-major order"
        ) from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise ProtocolError(f"{where}: 'data' must hold numbers for datatype {datatype}")
    if arr.size != count:
        raise ProtocolError(f"{where}: {arr.size} values, but shape {shape} needs {count}")
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu" and arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0):
        raise ProtocolError(f"{where}: datatype {datatype} needs integers, 'data' holds fractions")
    if dtype.kind in "iu" and arr.size:
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise ProtocolError(
                f"{where}: values outside the range of {datatype} ({info.min}..{info.max})"
            )
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused just below
        out = arr.astype(dtype)
    _check_finite(out, datatype, where)
    return out.reshape(shape)


def _check_finite(arr: np.ndarray, datatype: str, where: str) -> None:
    """Non-finite floats (NaN, Infinity, or values beyond the datatype's range) are refused: no
    answer may carry one, and strict JSON has none."""
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        raise ProtocolError(
            f"{where}: 'data' holds NaN, Infinity or values outside the range of {datatype}"
        )


def _flatten(data: list) -> list:
    out: list = []
    for item in data:
        if isinstance(item, list):
            out.extend(_flatten(item))
        else:
            out.append(item)
    return out


def _object_array(items: list[bytes], shape: list[int]) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr.reshape(shape)


def _parse_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in raw
    ):
        raise ProtocolError("field 'outputs' must be a list of objects with a 'name'")
    out = []
    for o in raw:
        params = o.get("parameters") or {}
        binary = params.get("binary_data") if isinstance(params, dict) else None
        out.append(RequestedOutput(o["name"], None if binary is None else bool(binary)))
    return out


def check_outputs(request: InferRequest, names: list[str]) -> None:
    """ProtocolError (400) when the request asks for an output the model does not have."""
    for wanted in request.outputs or []:
        if wanted.name not in names:
            raise ProtocolError(f"unknown output '{wanted.name}' (outputs: {', '.join(names)})")


def select_outputs(request: InferRequest, available: list[Tensor]) -> list[tuple[Tensor, bool]]:
    """The outputs the request asked for (all by default), each with whether to send it as
    binary."""
    check_outputs(request, [t.name for t in available])
    if request.outputs is None:
        return [(t, request.binary_output) for t in available]
    by_name = {t.name: t for t in available}
    return [
        (by_name[w.name], request.binary_output if w.binary is None else w.binary)
        for w in request.outputs
    ]


def encode_infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[tuple[Tensor, bool]],
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Response body and extra headers: plain JSON, or a JSON header plus binary outputs.
    ``parameters`` becomes the response's ``parameters`` object."""
    entries, chunks = [], []
    for tensor, binary in outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if binary:
            raw = _to_binary(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _to_json(tensor)
        entries.append(entry)
    payload: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": entries,
    }
    if request_id is not None:
        payload["id"] = request_id
    if parameters:
        payload["parameters"] = parameters
    # allow_nan=False: strict JSON out (a non-finite value is a ValueError here, never a bad body)
    header = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {
        "content-type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def _to_binary(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return b"".join(
            struct.pack("<I", len(v)) + v for v in (_as_bytes(x) for x in tensor.data.ravel())
        )
    dtype = DATATYPES[tensor.datatype].newbyteorder("<")
    return np.ascontiguousarray(tensor.data, dtype=dtype).tobytes()


def _to_json(tensor: Tensor) -> list:
    if tensor.datatype == "BYTES":
        return [_as_bytes(x).decode("utf-8", errors="replace") for x in tensor.data.ravel()]
    return tensor.data.ravel().tolist()


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def error_body(message: str) -> bytes:
    """The protocol's error object: ``{"error": message}``."""
    return json.dumps({"error": message}, allow_nan=False).encode()
