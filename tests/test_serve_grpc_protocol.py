"""The gRPC OIP messages, in-process (no Ray): what tritonclient's gRPC client sends decodes through
the REST path's decoder, the answer reads back in tritonclient, errors map to gRPC codes, and
tritonclient's own copy of the KServe messages coexists with Kiln's in one process."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from kiln.serve import oip_pb2
from kiln.serve.grpc_protocol import grpc_code, infer_request, infer_response
from kiln.serve.limits import LimitError, LimitsConfig
from kiln.serve.protocol import ProtocolError, Tensor

LIMITS = LimitsConfig(max_rows=16)


def triton_request(x: np.ndarray, datatype: str, binary: bool = True, outputs=()):
    """A ModelInferRequest as tritonclient.grpc builds it, parsed by Kiln's message class."""
    import tritonclient.grpc as tc
    from tritonclient.grpc._utils import _get_inference_request

    tensor = tc.InferInput("input", list(x.shape), datatype)
    if binary:
        tensor.set_data_from_numpy(x)
    else:  # the typed contents a client fills itself
        tensor._input.contents.fp32_contents.extend(x.ravel().tolist())
    wanted = [tc.InferRequestedOutput(name) for name in outputs]
    msg = _get_inference_request(
        "digits", [tensor], "2", "req-1", wanted, 0, False, False, 0, None, None
    )
    return oip_pb2.ModelInferRequest.FromString(msg.SerializeToString())


def test_tritonclient_raw_tensors_decode_like_rest():
    x = np.arange(2 * 64, dtype=np.uint8).reshape(2, 1, 8, 8)
    req = infer_request(triton_request(x, "UINT8", outputs=["label"]), LIMITS)
    assert req.id == "req-1" and [o.name for o in req.outputs] == ["label"]
    (tensor,) = req.inputs
    assert tensor.name == "input" and tensor.datatype == "UINT8" and tensor.shape == [2, 1, 8, 8]
    np.testing.assert_array_equal(tensor.data, x)


def test_typed_contents_decode_too():
    x = np.linspace(0, 1, 8, dtype=np.float32).reshape(2, 4)
    req = infer_request(triton_request(x, "FP32", binary=False), LIMITS)
    np.testing.assert_allclose(req.inputs[0].data, x)


def test_bad_requests_raise_the_rest_paths_errors():
    x = np.zeros((2, 4), np.float32)
    msg = triton_request(x, "FP32")
    msg.inputs[0].shape[:] = [3, 4]  # the raw bytes hold 2 rows
    with pytest.raises(ProtocolError) as err:
        infer_request(msg, LIMITS)
    assert err.value.status == 400 and "needs" in str(err.value)
    with pytest.raises(LimitError) as over:
        infer_request(triton_request(np.zeros((17, 4), np.float32), "FP32"), LIMITS)
    assert over.value.status == 413 and "serve.limits.max_rows" in str(over.value)
    msg = triton_request(x, "FP32")
    msg.inputs[0].datatype = "FP128"
    with pytest.raises(ProtocolError, match="unknown datatype"):
        infer_request(msg, LIMITS)


def test_the_answer_reads_back_in_tritonclient():
    from tritonclient.grpc import InferResult, service_pb2

    probs = np.array([[0.25, 0.75]], np.float32)
    labels = np.empty(1, dtype=object)
    labels[:] = [b"cat"]
    response = infer_response(
        "m",
        "3",
        "req-1",
        [
            (Tensor("probabilities", "FP32", [1, 2], probs), True),
            (Tensor("label", "BYTES", [1], labels), True),
        ],
        {"ood": [False], "ood_threshold": 0.5},
    )
    result = InferResult(service_pb2.ModelInferResponse.FromString(response.SerializeToString()))
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)
    assert result.as_numpy("label").tolist() == [b"cat"]
    out = result.get_response()
    assert (out.model_name, out.model_version, out.id) == ("m", "3", "req-1")
    assert out.parameters["ood"].string_param == "[false]"


def test_http_statuses_map_to_grpc_codes():
    assert grpc_code(400) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_code(401) == grpc_code(403) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_code(404) == grpc.StatusCode.NOT_FOUND
    assert grpc_code(413) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_code(503) == grpc.StatusCode.UNAVAILABLE
    assert grpc_code(500) == grpc_code(599) == grpc.StatusCode.INTERNAL
