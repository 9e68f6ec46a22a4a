"""The Open Inference Protocol codec, the served-version input handling and the serve config (no
Ray)."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest

from kiln.errors import ConfigError
from kiln.serve.protocol import (
    InferRequest,
    ProtocolError,
    RequestedOutput,
    Tensor,
    encode_infer_response,
    parse_infer_request,
    select_outputs,
)


def triton_request(inputs, outputs=None, **kw) -> tuple[bytes, str | None]:
    """A request body exactly as tritonclient builds it (its own encoder), and its header length."""
    from tritonclient.http._utils import _get_inference_request

    body, json_size = _get_inference_request(
        inputs=inputs,
        request_id="7",
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        custom_parameters=None,
        **kw,
    )
    return body, None if json_size is None else str(json_size)


@pytest.mark.parametrize("binary", [True, False])
def test_parses_tritonclient_requests(binary):
    import tritonclient.http as httpclient

    x = np.arange(2 * 3, dtype=np.uint8).reshape(2, 3)
    pics = np.array([b"cat", b"dog!"], dtype=object)
    a = httpclient.InferInput("input", [2, 3], "UINT8")
    a.set_data_from_numpy(x, binary_data=binary)
    b = httpclient.InferInput("images", [2], "BYTES")
    b.set_data_from_numpy(pics, binary_data=binary)
    body, header = triton_request(
        [a, b], [httpclient.InferRequestedOutput("label", binary_data=binary)]
    )
    req = parse_infer_request(body, header)
    assert req.id == "7"
    np.testing.assert_array_equal(req.inputs[0].data, x)
    assert list(req.inputs[1].data) == [b"cat", b"dog!"]
    assert req.outputs == [RequestedOutput("label", binary)]


def test_binary_response_decodes_with_tritonclient():
    from tritonclient.http import InferResult

    probs = np.array([[0.25, 0.75]], np.float32)
    labels = np.array([b"cat"], dtype=object)
    outputs = [
        Tensor("probabilities", "FP32", [1, 2], probs),
        Tensor("label", "BYTES", [1], labels),
    ]
    req = InferRequest(inputs=[], binary_output=True)
    body, headers = encode_infer_response("m", "3", "id-1", select_outputs(req, outputs))
    result = InferResult.from_response_body(
        body, header_length=int(headers["Inference-Header-Content-Length"])
    )
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)
    assert list(result.as_numpy("label")) == [b"cat"]
    assert result.get_response()["model_version"] == "3" and result.get_response()["id"] == "id-1"


def test_json_response_is_plain_json():
    outputs = [Tensor("probabilities", "FP32", [1, 2], np.array([[0.5, 0.5]], np.float32))]
    body, headers = encode_infer_response(
        "m", "1", None, select_outputs(InferRequest(inputs=[]), outputs)
    )
    assert headers == {"content-type": "application/json"}
    assert json.loads(body)["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [1, 2], "data": [0.5, 0.5]}
    ]


BINARY_HEADER = (
    b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", '
    b'"parameters": {"binary_data_size": 8}}]}'
)


@pytest.mark.parametrize(
    "body, header, words",
    [
        (b"", None, "request body is empty"),
        (b"\x80abc", None, "not valid JSON (not UTF-8 text)"),
        (b'{"inputs": []}', None, "'inputs' must be a non-empty list"),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP99", "data": [1, 2]}]}',
            None,
            "unknown datatype",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}',
            None,
            "non-negative integers",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "INT8", "data": [1, 900]}]}',
            None,
            "outside the range",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "INT8", "data": [1, 2.5]}]}',
            None,
            "holds fractions",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}]}',
            None,
            "must hold numbers",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], '
            b"[3]]}]}",
            None,
            "ragged",
        ),
        (BINARY_HEADER, str(len(BINARY_HEADER) + 1), "does not fit a body"),
        (BINARY_HEADER + b"abc", str(len(BINARY_HEADER)), "does not fit the 3 bytes"),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
            "abc",
            "not an integer",
        ),
    ],
)
def test_bad_requests_name_the_problem(body, header, words):
    with pytest.raises(ProtocolError, match=re.escape(words)) as err:
        parse_infer_request(body, header)
    assert err.value.status == 400


def test_bytes_binary_length_prefixes_are_checked():
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 9},
                }
            ]
        }
    ).encode()
    one = struct.pack("<I", 5) + b"hello"  # 9 bytes, one element, but shape [2] needs two
    with pytest.raises(ProtocolError, match="holds 1 elements, shape \\[2\\] needs 2"):
        parse_infer_request(header + one, str(len(header)))


def test_unknown_requested_output_is_a_400():
    req = InferRequest(inputs=[], outputs=[RequestedOutput("logits")])
    with pytest.raises(ProtocolError, match="unknown output 'logits' \\(outputs: probabilities\\)"):
        select_outputs(req, [Tensor("probabilities", "FP32", [1, 1], np.zeros((1, 1), np.float32))])


def test_serve_config_validation_names_keys():
    from kiln.schema import validate_config

    cfg = validate_config(
        {
            "serve": {
                "models": [
                    "models:/a/1",
                    {"uri": "models:/a@champion", "default": True, "deployment": {"num_cpus": 1.0}},
                ],
                "batching": {"max_batch_size": 8},
            }
        }
    )
    merged = cfg.serve.deployment_for(cfg.serve.models)
    assert (merged.num_cpus, merged.replicas, cfg.serve.batching.max_batch_size) == (1.0, 1, 8)
    for data, words in [
        (
            {"serve": {"models": ["runs:/abc/model"]}},
            "serve.models.0.uri': 'runs:/abc/model' is not a registry URI",
        ),
        ({"serve": {"portt": 1}}, "unknown config key 'serve.portt' (did you mean 'serve.port'?)"),
        ({"serve": {"ingress": "nginx"}}, "serve.ingress"),
        ({"serve": {"models": [{"uri": "models:/a/1", "name": "has space"}]}}, "part of URLs"),
        (
            {"serve": {"deployment": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}},
            "min_replicas must not exceed max_replicas",
        ),
        (
            {
                "serve": {
                    "models": [
                        {"uri": "models:/a/1", "batching": {"wait_ms": 1}},
                        {"uri": "models:/a/2", "batching": {"wait_ms": 2}},
                    ]
                }
            },
            "set them on one entry",
        ),
    ]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            validate_config(data)


def test_cli_targets_split_into_config_uris_and_overrides(tmp_path):
    from kiln.commands.serve import split_targets

    cfg = tmp_path / "serve.yaml"
    cfg.write_text("serve: {port: 9000}\n")
    assert split_targets([str(cfg), "models:/a/1", "serve.port=0"]) == (
        str(cfg),
        ["models:/a/1"],
        ["serve.port=0"],
    )
    with pytest.raises(ConfigError, match="'digits' is neither a config file"):
        split_targets(["digits"])


def test_served_version_checks_inputs_against_the_model():
    """Shapes, datatypes and convenience bodies are checked before the model sees anything."""
    from kiln.data.preprocess import Preprocessing
    from kiln.models.predictor import Predictor
    from kiln.models.spec import ModelSpec
    from kiln.serve.versions import ServedVersion

    prep = Preprocessing(kind="image", mean=[0.5], std=[0.25], channels=1, image_size=[8, 8])
    spec = ModelSpec("cnn", {}, [1, 8, 8], labels=[3, 5], preprocessing=prep)
    served = ServedVersion(
        "digits", "1", Predictor(spec, lambda x: np.zeros((len(x), 2), np.float32), "test")
    )
    x = np.full((2, 8, 8), 128, np.uint8)  # [N, H, W] for a one-channel model
    ready = served.prepare_tensors([Tensor("input", "UINT8", [2, 8, 8], x)])
    np.testing.assert_allclose(
        ready, np.full((2, 1, 8, 8), (128 / 255 - 0.5) / 0.25, np.float32), atol=1e-6
    )
    with pytest.raises(ProtocolError, match="takes one input named 'input', got 'pixels'"):
        served.prepare_tensors([Tensor("pixels", "UINT8", [2, 8, 8], x)])
    with pytest.raises(ProtocolError, match="shape \\[0, 1, 8, 8\\] holds no rows"):
        served.prepare_tensors(
            [Tensor("input", "UINT8", [0, 1, 8, 8], np.zeros((0, 1, 8, 8), np.uint8))]
        )
    with pytest.raises(ProtocolError, match="missing field 'images'"):
        served.prepare_json({"records": []})
    predictions = served.predictions(np.array([[0.0, 2.0]], np.float32))
    assert predictions[0]["label"] == 5 and list(predictions[0]["probabilities"]) == ["3", "5"]


def test_deployment_options_carry_replicas_autoscaling_cpus_and_batching():
    from kiln.serve.app import deployment_options
    from kiln.serve.config import AutoscalingConfig, BatchingConfig, DeploymentConfig
    from kiln.serve.plan import ModelPlan, VersionSource

    plan = ModelPlan(
        name="digits",
        versions=[VersionSource("1", "models:/digits/1")],
        default_version="1",
        deployment=DeploymentConfig(num_cpus=0.25, replicas=3, threads=2),
        batching=BatchingConfig(max_batch_size=8, wait_ms=2.0),
    )
    options = deployment_options(plan)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {
        "num_cpus": 0.25,
        "runtime_env": {
            "env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "OMP_NUM_THREADS": "2"}
        },
    }
    assert options["user_config"] == {
        "batching": {"enabled": True, "max_batch_size": 8, "wait_ms": 2.0}
    }
    plan.deployment = DeploymentConfig(
        autoscaling=AutoscalingConfig(min_replicas=0, max_replicas=4)
    )
    options = deployment_options(plan)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 4,
        "target_ongoing_requests": 16.0,
    }
    assert plan.min_cpus == 0.0  # scale-to-zero reserves nothing up front


@pytest.mark.parametrize(
    "host, key, warned",
    [
        ("127.0.0.1", False, False),
        ("::1", False, False),
        ("localhost", False, False),
        ("0.0.0.0", False, True),
        ("192.0.2.7", False, True),
        ("my-host.example", False, True),
        ("0.0.0.0", True, False),
    ],
)
def test_a_non_loopback_host_without_an_api_key_is_warned_about(host, key, warned):
    from kiln.serve.cluster import exposure_warning

    message = exposure_warning(host, key)
    assert (message is not None) == warned
    if warned:
        assert host in message and "API key" in message
