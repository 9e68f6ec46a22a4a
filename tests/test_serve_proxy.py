"""``ingress: proxy`` (Ray Serve's Python proxy, kept as an option) still serves: a REST request,
and a gRPC call from tritonclient without Ray's ``application`` metadata (the proxy sends it to
Kiln's root app, which forwards it to the model's app by handle). Its own local Ray instance:
Serve's ingress mode is fixed when Serve starts on a cluster, and the session's runs HAProxy."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import requests

from conftest import last_json, run_kiln
from served_models import digits_raw, uint8_batch_body

pytestmark = pytest.mark.module_seconds(60)


@pytest.mark.slow  # starts its own Ray instance: about a minute
def test_the_proxy_ingress_serves_rest_and_grpc(registry, tmp_path):
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    run_dir = tmp_path / "runs"
    proc = run_kiln(
        "serve",
        "start",
        registry.uris["fp32-cnn"],
        registry.uris["fp32-mlp"],
        "--ingress",
        "proxy",
        "--num-cpus",
        "1",
        "--port",
        "0",  # Kiln picks it (and picks again if it is taken before Serve binds it)
        "--run-dir",
        str(run_dir),
        "--json",
        env={"MLFLOW_TRACKING_URI": registry.tracking_uri},
        timeout=600,
    )
    try:
        assert proc.returncode == 0, proc.stderr
        info = last_json(proc.stdout)
        assert info["ingress"] == "proxy"
        x = digits_raw(2)
        body = uint8_batch_body(x)
        rest = requests.post(f"{info['url']}/v2/models/digits/infer", json=body, timeout=30)
        assert rest.status_code == 200, rest.text
        with tc.InferenceServerClient(info["grpc_url"]) as client:
            tensor = tc.InferInput("input", list(x.shape), "UINT8")
            tensor.set_data_from_numpy(x)
            result = client.infer("digits", [tensor], model_version="1")
            np.testing.assert_allclose(
                result.as_numpy("probabilities"),
                np.asarray(rest.json()["outputs"][0]["data"], np.float32).reshape(2, 10),
                atol=1e-6,
            )
            assert client.get_model_metadata("iris").name == "iris"
            with pytest.raises(InferenceServerException) as err:
                client.infer("nope", [tensor])
            assert err.value.status() == str(grpc.StatusCode.NOT_FOUND)
    finally:
        stop = run_kiln("serve", "stop", "--run-dir", str(run_dir), timeout=300)
        assert stop.returncode == 0, stop.stderr
