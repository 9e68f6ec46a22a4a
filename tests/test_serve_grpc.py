"""The Open Inference Protocol over gRPC, through tritonclient's gRPC client, unchanged (no
``application`` metadata): metadata, infer with a version and without, errors mapped to gRPC status
codes, the API key (refused over gRPC as over REST). One app per module on the session's Ray
instance (the default ingress, HAProxy), serving two models so that calls are routed by model name.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import requests

from conftest import last_json, run_kiln
from served_models import digits_raw, iris_rows, serve_args, uint8_batch_body

KEY_ENV = "KILN_TEST_GRPC_KEY"
API_KEY = "grpc-test-key"
MAX_ROWS = 64
MAX_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def app(ray_cluster, registry):
    """digits and iris served with an API key, once per module; stopped after it."""
    env = {"MLFLOW_TRACKING_URI": registry.tracking_uri, KEY_ENV: API_KEY}
    proc = run_kiln(
        *serve_args(
            ray_cluster,
            registry,
            registry.uris["fp32-cnn"],
            registry.uris["fp32-mlp"],
            f"serve.limits.max_rows={MAX_ROWS}",
            f"serve.max_request_bytes={MAX_BYTES}",
            "--port",
            "0",  # Kiln picks it (and picks again if it is taken before Serve binds it)
            "--api-key-env",
            KEY_ENV,
        ),
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    info = last_json(proc.stdout)
    yield info
    run_kiln("serve", "stop", "--address", ray_cluster, "--run-dir", str(registry.run_dir))


@pytest.fixture(scope="module")
def client(app):
    import tritonclient.grpc as tc

    assert app["grpc_url"] and app["grpc_url"].startswith("127.0.0.1:")
    with tc.InferenceServerClient(app["grpc_url"]) as c:
        yield c


KEY = {"x-api-key": API_KEY}


def digits_input(x: np.ndarray):
    import tritonclient.grpc as tc

    tensor = tc.InferInput("input", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x)
    return tensor


def grpc_code(call) -> grpc.StatusCode:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as err:
        call()
    return grpc.StatusCode[err.value.status().removeprefix("StatusCode.")]


def test_server_and_model_metadata(client, app):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "kiln"
    model = client.get_model_metadata("digits", "1")
    assert model.name == "digits" and list(model.versions) == ["1"]
    assert [i.name for i in model.inputs] == ["input"]
    assert [o.name for o in model.outputs] == ["probabilities", "label"]
    assert client.is_model_ready("iris") and client.is_model_ready("digits", "1")


def test_infer_with_a_version_matches_rest(client, app, registry):
    x = digits_raw(4)
    result = client.infer("digits", [digits_input(x)], model_version="1", headers=KEY)
    probs = result.as_numpy("probabilities")
    assert probs.shape == (4, 10)
    assert result.get_response().model_version == "1"
    body = uint8_batch_body(x)
    rest = requests.post(
        f"{app['url']}/v2/models/digits/versions/1/infer", json=body, headers=KEY, timeout=30
    )
    assert rest.status_code == 200, rest.text
    np.testing.assert_allclose(
        probs, np.asarray(rest.json()["outputs"][0]["data"], np.float32).reshape(4, 10), atol=1e-6
    )
    labels = result.as_numpy("label")
    assert [v.decode() for v in labels] == [str(int(i)) for i in probs.argmax(axis=1)]


def test_a_second_model_is_routed_by_its_name(client, registry):
    import tritonclient.grpc as tc

    rows, _ = iris_rows(registry.iris, 3)
    tensor = tc.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows.astype(np.float32))
    result = client.infer("iris", [tensor], headers=KEY)
    assert result.get_response().model_name == "iris"
    assert result.as_numpy("probabilities").shape == (3, 3)


def test_errors_map_to_grpc_status_codes(client):
    x = digits_raw(2)
    assert (
        grpc_code(lambda: client.infer("no-such-model", [digits_input(x)], headers=KEY))
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        grpc_code(lambda: client.infer("digits", [digits_input(x)], model_version="9", headers=KEY))
        == grpc.StatusCode.NOT_FOUND
    )
    assert grpc_code(lambda: client.get_model_metadata("nope")) == grpc.StatusCode.NOT_FOUND
    bad = digits_input(x.reshape(2, -1))  # flat rows: not an image
    assert (
        grpc_code(lambda: client.infer("digits", [bad], headers=KEY))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    many = digits_raw(MAX_ROWS + 1)  # over serve.limits.max_rows
    assert (
        grpc_code(lambda: client.infer("digits", [digits_input(many)], headers=KEY))
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    big = np.zeros((1, 1, 300, 300), np.uint8)  # 90 KB: over serve.max_request_bytes
    assert (
        grpc_code(lambda: client.infer("digits", [digits_input(big)], headers=KEY))
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )


def test_a_request_without_the_api_key_is_refused_over_grpc_as_over_rest(client, app):
    x = digits_raw(1)
    assert (
        grpc_code(lambda: client.infer("digits", [digits_input(x)]))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        grpc_code(lambda: client.infer("digits", [digits_input(x)], headers={"x-api-key": "wrong"}))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    bearer = {"authorization": f"Bearer {API_KEY}"}
    assert client.infer("digits", [digits_input(x)], headers=bearer).as_numpy("label").shape == (1,)
    rest = requests.post(
        f"{app['url']}/v2/models/digits/infer",
        json={
            "inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 8, 8], "data": [0] * 64}]
        },
        timeout=30,
    )
    assert rest.status_code == 401


def test_status_reports_the_grpc_url(app, ray_cluster, registry):
    proc = run_kiln(
        "serve", "status", "--address", ray_cluster, "--run-dir", str(registry.run_dir), "--json"
    )
    assert proc.returncode == 0, proc.stderr
    assert last_json(proc.stdout)["grpc_url"] == app["grpc_url"]
