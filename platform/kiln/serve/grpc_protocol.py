"""The Open Inference Protocol over gRPC (KServe v2 ``GRPCInferenceService``): its messages to and
from the protocol's own ``InferRequest`` and ``Tensor``, and HTTP statuses to gRPC status codes.

Decoding goes through ``protocol.decode_tensor``, the decoder of the REST path: the same checks and
``serve.limits`` budgets hold over both protocols. ``raw_input_contents`` (what tritonclient sends)
is the binary extension's layout; typed ``contents`` are decoded as the JSON ``data`` is. Outputs
are always answered as ``raw_output_contents``, as Triton does.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

from kiln.serve import oip_pb2
from kiln.serve.limits import LimitsConfig, check_rows
from kiln.serve.protocol import (
    MAX_ID_CHARS,
    InferRequest,
    ProtocolError,
    RequestedOutput,
    Tensor,
    _to_binary,
    decode_tensor,
)

# The typed ``contents`` field of each datatype (KServe's InferTensorContents; FP16 has none: raw).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# HTTP status of a Kiln error -> the name of its gRPC status code. A missing or a wrong API key are
# both UNAUTHENTICATED (gRPC keeps PERMISSION_DENIED for a caller it has identified); a request
# over a serve.limits budget is RESOURCE_EXHAUSTED, as one over gRPC's own message size is.
GRPC_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    413: "RESOURCE_EXHAUSTED",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def grpc_code(status: int) -> Any:
    """The ``grpc.StatusCode`` of an HTTP status (INTERNAL for one not listed)."""
    import grpc

    return grpc.StatusCode[GRPC_CODES.get(status, "INTERNAL")]


def grpc_reply(grpc_context: Any, reply: Any, status: int, message: str) -> Any:
    """``reply``, with the call's status code and details set on ``grpc_context`` when ``status``
    is an error (Ray Serve sends the code it finds there; the message body is then ignored)."""
    if status != 200 and grpc_context is not None:
        grpc_context.set_code(grpc_code(status))
        grpc_context.set_details(message)
    return reply


def metadata_headers(grpc_context: Any) -> dict[str, str]:
    """A gRPC call's metadata as headers (keys are lower case in gRPC, as ``check_api_key`` and
    the rollout's sticky header read them); binary (``-bin``) entries are left out."""
    if grpc_context is None:
        return {}
    return {
        key: value
        for key, value in grpc_context.invocation_metadata()
        if isinstance(value, str) and not key.endswith("-bin")
    }


def infer_request(msg: Any, limits: LimitsConfig) -> InferRequest:
    """The ``InferRequest`` of a ``ModelInferRequest``, every tensor decoded by the REST path's
    decoder. Raises ProtocolError or LimitError."""
    check_rows(len(msg.inputs), limits, "field 'inputs'")
    if not msg.inputs:
        raise ProtocolError("field 'inputs' must be a non-empty list")
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise ProtocolError(
            f"raw_input_contents holds {len(raw)} tensors, but the request has "
            f"{len(msg.inputs)} inputs (send all inputs raw, or none)"
        )
    inputs = []
    for i, tensor in enumerate(msg.inputs):
        where = f"inputs[{i}]"
        shape, datatype = list(tensor.shape), tensor.datatype
        if raw:
            inputs.append(
                decode_tensor(tensor.name, shape, datatype, limits, raw=raw[i], where=where)
            )
            continue
        field = CONTENTS_FIELD.get(datatype)
        if field is None:
            # the header check names an unknown datatype; FP16 has no typed contents
            decode_tensor(tensor.name, shape, datatype, limits, raw=b"", where=where)
            raise ProtocolError(f"input '{tensor.name}': {datatype} must be sent raw")
        values = getattr(tensor.contents, field)
        if datatype == "BYTES":
            chunk = b"".join(struct.pack("<I", len(v)) + v for v in values)
            inputs.append(
                decode_tensor(tensor.name, shape, datatype, limits, raw=chunk, where=where)
            )
        else:
            inputs.append(
                decode_tensor(tensor.name, shape, datatype, limits, data=list(values), where=where)
            )
    if len(msg.id) > MAX_ID_CHARS:
        raise ProtocolError(f"field 'id' must be a string of at most {MAX_ID_CHARS} characters")
    # Outputs always go back raw; the binary flag only matters to the REST encoder.
    outputs = [RequestedOutput(o.name, True) for o in msg.outputs] or None
    return InferRequest(inputs=inputs, id=msg.id or None, outputs=outputs, binary_output=True)


def infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[tuple[Tensor, bool]],
    parameters: dict[str, Any] | None = None,
) -> Any:
    """A ``ModelInferResponse``: each output's metadata, its bytes in ``raw_output_contents``.
    ``parameters`` values that are neither booleans, integers nor strings go as JSON strings
    (KServe's InferParameter holds no lists or floats)."""
    response = oip_pb2.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request_id or ""
    )
    for tensor, _binary in outputs:
        out = response.outputs.add()
        out.name, out.datatype = tensor.name, tensor.datatype
        out.shape.extend(tensor.shape)
        response.raw_output_contents.append(_to_binary(tensor))
    for key, value in (parameters or {}).items():
        param = response.parameters[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, str):
            param.string_param = value
        else:
            param.string_param = json.dumps(value, separators=(",", ":"), allow_nan=False)
    return response


def metadata_response(metadata: Mapping[str, Any]) -> Any:
    """A ``ModelMetadataResponse`` from the REST path's model metadata (its ``parameters``, which
    the message has no field for, are left out)."""
    response = oip_pb2.ModelMetadataResponse(
        name=metadata["name"],
        versions=list(metadata.get("versions", [])),
        platform=metadata.get("platform", ""),
    )
    for key, target in (("inputs", response.inputs), ("outputs", response.outputs)):
        for tensor in metadata.get(key, []):
            target.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
    return response
