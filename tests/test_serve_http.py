"""kiln serve against a running app over real HTTP on 127.0.0.1 (the module's Ray instance, 2 CPUs).

Served: every variant of VARIANTS, plus a second digits version, behind an API key. The first tests
check the ways `kiln serve start` refuses to start while serving; one test stops the app (the
next test that needs it starts it again). Refusals that need an idle cluster are in
test_serve_start.py.
"""

# Fixtures imported from served_models by name are redefined as parameters (pytest's way):
from __future__ import annotations

import base64
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import REPO, last_json, run_kiln
from kiln.waiting import wait_until
from ray_actors import replica_pids
from served_models import (
    CNN,
    DIGITS,
    VARIANTS,
    digits_raw,
    iris_rows,
    png_b64,
    serve_args,
    train_and_register,
)

pytestmark = pytest.mark.module_seconds(80)

API_KEY = "test-key-7f3a"
KEY_ENV = "KILN_TEST_API_KEY"
MAX_BODY = 65536
HEADERS = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def second_digits(registry) -> str:
    """Version 2 of the digits model (another seed: different weights, same interface)."""
    return train_and_register(registry.run_dir, "digits", DIGITS, CNN, epochs=2, seed=1)


def kiln_env(registry) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": registry.tracking_uri, KEY_ENV: API_KEY}


def start_app(app: dict) -> dict:
    """``kiln serve start`` of the module's app (arguments in ``app``); returns its JSON line."""
    proc = run_kiln(*app["args"], env=app["env"], timeout=600)
    assert proc.returncode == 0, proc.stderr
    return last_json(proc.stdout)


@pytest.fixture(scope="module")
def app(ray_cluster, registry, second_digits):
    """The app, started with `kiln serve start` as a user would, once per module; stopped after
    it."""
    uris = [*registry.uris.values(), second_digits]
    app = {
        "args": serve_args(
            ray_cluster,
            registry,
            *uris,
            f"serve.max_request_bytes={MAX_BODY}",
            "--port",
            "0",  # Kiln picks it (and picks again if it is taken before Serve binds it)
            "--api-key-env",
            KEY_ENV,
        ),
        "env": kiln_env(registry),
    }
    app["info"] = start_app(app)
    yield app
    run_kiln("serve", "stop", "--address", ray_cluster, "--run-dir", str(registry.run_dir))


@pytest.fixture
def served(app) -> dict:
    """The running app's `kiln serve start` JSON; started again first when a test stopped it
    (``test_stop_removes_the_app``), so that no test depends on the order."""
    try:
        live = requests.get(f"{app['info']['url']}/v2/health/live", timeout=10).ok
    except requests.RequestException:
        live = False
    if not live:
        app["info"] = start_app(app)
    return app["info"]


@pytest.fixture(scope="module")
def predictors(registry, second_digits):
    from kiln.models.predictor import load_predictor

    uris = {**registry.uris, "digits-v2": second_digits}
    return {key: load_predictor(uri, registry.tracking_uri) for key, uri in uris.items()}


def served_versions(registry) -> set[tuple[str, str]]:
    """(served name, version) of everything the module serves: each variant, plus digits version
    2."""
    return {(v.served_name, registry.uris[i].rsplit("/", 1)[1]) for i, v in VARIANTS.items()} | {
        ("digits", "2")
    }


def raw_inputs(registry, kind: str):
    """(raw array, convenience body) for a variant kind."""
    if kind == "image":
        images = digits_raw(16)
        return images, {"images": [png_b64(img) for img in images]}
    x, records = iris_rows(registry.iris, 12)
    return x, {"records": records}


def oip_body(kind: str, x: np.ndarray) -> dict:
    datatype = "UINT8" if kind == "image" else "FP32"
    return {
        "id": "r1",
        "inputs": [
            {
                "name": "input",
                "datatype": datatype,
                "shape": list(x.shape),
                "data": x.ravel().tolist(),
            }
        ],
    }


def infer(url: str, body, path: str, headers=HEADERS, **kw) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"{url}{path}", data=data, headers=headers, timeout=60, **kw)


# --- refusing to start -------------------------------------------------------------------------


def test_plan_resolves_aliases_latest_and_the_default_version(registry, second_digits):
    from kiln import tracking as trk
    from kiln.errors import ConfigError
    from kiln.serve.config import ServeConfig
    from kiln.serve.plan import plan_serving

    trk.set_alias(registry.tracking_uri, "digits", "champion", "1")
    plan = plan_serving(
        ServeConfig(models=["models:/digits@champion", "models:/digits/latest", "models:/iris/1"]),
        registry.tracking_uri,
    )
    digits, iris = plan.models
    assert [v.version for v in digits.versions] == ["1", "2"] and digits.default_version == "2"
    assert digits.versions[0].uri == "models:/digits/1"  # the alias is pinned at start
    assert (iris.name, iris.default_version, digits.formats) == (
        "iris",
        "1",
        {"1": "safetensors", "2": "safetensors"},
    )
    chosen = plan_serving(
        ServeConfig(models=[{"uri": "models:/digits/1", "default": True}, "models:/digits/2"]),
        registry.tracking_uri,
    )
    assert chosen.models[0].default_version == "1"
    with pytest.raises(
        ConfigError, match="is version 1 of 'digits', already served by serve.models.0"
    ):
        plan_serving(
            ServeConfig(models=["models:/digits/1", "models:/digits@champion"]),
            registry.tracking_uri,
        )


def test_start_rejects_unknown_model(ray_cluster, registry):
    proc = run_kiln(
        *serve_args(ray_cluster, registry, "models:/no-such-model/1"), env=kiln_env(registry)
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: unknown model 'models:/no-such-model/1' in registry {registry.tracking_uri}"
    )


# --- the running app --------------------------------------------------------------------------


def test_start_reports_url_and_every_version(served, registry):
    url = served["url"]
    assert url.startswith("http://127.0.0.1:")
    got = {(m["name"], m["version"]): m for m in served["models"]}
    assert set(got) == served_versions(registry)
    assert got[("digits", "2")]["infer_url"] == f"{url}/v2/models/digits/versions/2/infer"
    assert got[("digits", "2")]["default"] and not got[("digits", "1")]["default"]
    assert served["api_key_required"] is True


def test_health_and_metadata(served):
    url = served["url"]
    assert requests.get(f"{url}/v2/health/live", timeout=10).json() == {"live": True}
    assert requests.get(f"{url}/v2/health/ready", timeout=10).json() == {"ready": True}
    assert requests.get(f"{url}/v2", timeout=10).json()["name"] == "kiln"
    meta = requests.get(f"{url}/v2/models/digits", timeout=10).json()
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
    iris = requests.get(f"{url}/v2/models/iris/versions/1", timeout=10).json()
    assert iris["inputs"][0]["shape"] == [-1, 4]
    assert iris["parameters"]["labels"] == ["setosa", "versicolor", "virginica"]
    assert requests.get(f"{url}/v2/models/iris/versions/1/ready", timeout=10).status_code == 200


@pytest.mark.parametrize("variant_id", list(VARIANTS))
def test_http_matches_in_process_predictions(served, registry, predictors, variant_id):
    """Both endpoints answer what the same registered version predicts in-process."""
    variant = VARIANTS[variant_id]
    predictor = predictors[variant_id]
    version = registry.uris[variant_id].rsplit("/", 1)[1]
    x, convenience = raw_inputs(registry, variant.kind)
    expected_p = predictor.predict_proba(x)
    expected_labels = predictor.predict(x)
    base = f"{served['url']}/v2/models/{variant.served_name}/versions/{version}"

    resp = infer(base, oip_body(variant.kind, x), "/infer")
    assert resp.status_code == 200, resp.text
    out = {o["name"]: o for o in resp.json()["outputs"]}
    assert resp.json()["id"] == "r1" and resp.json()["model_version"] == version
    probs = np.asarray(out["probabilities"]["data"], np.float32).reshape(
        out["probabilities"]["shape"]
    )
    np.testing.assert_allclose(probs, expected_p, atol=1e-5)
    assert out["label"]["data"] == [str(label) for label in expected_labels]

    resp = infer(base, convenience, "/predict")
    assert resp.status_code == 200, resp.text
    predictions = resp.json()["predictions"]
    assert [p["label"] for p in predictions] == expected_labels  # original label values and types
    got = np.asarray([list(p["probabilities"].values()) for p in predictions], np.float32)
    np.testing.assert_allclose(got, expected_p, atol=1e-5)


def test_tritonclient_round_trip(served, registry, predictors):
    """tritonclient's HTTP client, unchanged: binary tensors (its default) and JSON."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=served["url"].removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits", "1")
    meta = client.get_model_metadata("digits", "1", headers=dict(HEADERS))
    assert meta["inputs"][0]["datatype"] == "UINT8"
    x = digits_raw(8)
    expected = predictors["fp32-cnn"].predict_proba(x)
    for binary in (True, False):
        tensor = httpclient.InferInput("input", list(x.shape), "UINT8")
        tensor.set_data_from_numpy(x, binary_data=binary)
        outputs = [
            httpclient.InferRequestedOutput("probabilities", binary_data=binary),
            httpclient.InferRequestedOutput("label", binary_data=binary),
        ]
        result = client.infer(
            "digits", [tensor], model_version="1", outputs=outputs, headers=dict(HEADERS)
        )
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
        labels = [v.decode() if isinstance(v, bytes) else str(v) for v in result.as_numpy("label")]
        assert labels == [str(v) for v in predictors["fp32-cnn"].predict(x)]
    tensor = httpclient.InferInput("input", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x)
    result = client.infer(
        "digits", [tensor], headers=dict(HEADERS)
    )  # no outputs named: all, as binary
    assert result.get_response()["model_version"] == "2"
    assert result.as_numpy("probabilities").shape == (8, 10)


def bad_requests(url: str) -> list[tuple[str, str, object, dict, int, str]]:
    """(what, path, body, headers, expected status, expected words in the error)."""
    good = oip_body("image", digits_raw(2))
    wrong_shape = {
        "inputs": [{"name": "input", "datatype": "UINT8", "shape": [2, 64], "data": [0] * 128}]
    }
    wrong_type = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}]
    }
    short_data = {
        "inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 1, 8, 8], "data": [0] * 10}]
    }
    no_data = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 1, 8, 8]}]}
    bad_bytes = {
        "inputs": [{"name": "input", "datatype": "BYTES", "shape": [1], "data": ["not an image"]}]
    }
    digits = "/v2/models/digits/versions/1"
    return [
        ("not JSON", f"{digits}/infer", b"{not json", HEADERS, 400, "not valid JSON"),
        ("not an object", f"{digits}/infer", b"[1, 2]", HEADERS, 400, "must be a JSON object"),
        ("missing inputs", f"{digits}/infer", {"id": "x"}, HEADERS, 400, "missing field 'inputs'"),
        ("missing data", f"{digits}/infer", no_data, HEADERS, 400, "missing field 'data'"),
        (
            "wrong shape",
            f"{digits}/infer",
            wrong_shape,
            HEADERS,
            400,
            "shape [2, 64] does not match [-1, 1, 8, 8]",
        ),
        (
            "wrong datatype",
            f"{digits}/infer",
            wrong_type,
            HEADERS,
            400,
            "datatype FP32 is not accepted",
        ),
        (
            "data vs shape",
            f"{digits}/infer",
            short_data,
            HEADERS,
            400,
            "10 values, but shape [1, 1, 8, 8] needs 64",
        ),
        (
            "undecodable image",
            f"{digits}/infer",
            bad_bytes,
            HEADERS,
            400,
            "does not decode as an image",
        ),
        (
            "undecodable base64 image",
            f"{digits}/predict",
            {"images": ["aGVsbG8="]},
            HEADERS,
            400,
            "does not decode as an image",
        ),
        ("not base64", f"{digits}/predict", {"images": ["%%%"]}, HEADERS, 400, "not valid base64"),
        (
            "missing record field",
            "/v2/models/iris/predict",
            {"records": [{"sepal_length": 1.0}]},
            HEADERS,
            400,
            "missing feature columns: sepal_width, petal_length, petal_width",
        ),
        (
            "unknown output",
            f"{digits}/infer",
            {**good, "outputs": [{"name": "logits"}]},
            HEADERS,
            400,
            "unknown output 'logits'",
        ),
        (
            "body over the limit",
            f"{digits}/infer",
            b"x" * (MAX_BODY + 1),
            HEADERS,
            413,
            f"over the limit of {MAX_BODY} bytes",
        ),
        (
            "unknown model",
            "/v2/models/nope/infer",
            good,
            HEADERS,
            404,
            "unknown model 'nope' (served: digits, digits-int8, digits-pruned, iris)",
        ),
        (
            "unknown version",
            "/v2/models/digits/versions/7/infer",
            good,
            HEADERS,
            404,
            "has no served version '7' (served: 1, 2)",
        ),
        ("missing API key", f"{digits}/infer", good, {}, 401, "missing API key"),
        ("wrong API key", f"{digits}/infer", good, {"X-API-Key": "wrong"}, 403, "wrong API key"),
        (
            "wrong bearer token",
            f"{digits}/predict",
            {"images": []},
            {"Authorization": "Bearer nope"},
            403,
            "wrong API key",
        ),
    ]


def test_each_bad_input_gets_its_4xx_and_the_server_keeps_serving(served):
    url = served["url"]
    good = oip_body("image", digits_raw(2))
    for what, path, body, headers, status, words in bad_requests(url):
        resp = infer(url, body, path, headers=headers)
        assert resp.status_code == status, f"{what}: {resp.status_code} {resp.text}"
        assert resp.headers["content-type"].startswith("application/json"), what
        assert words in resp.json()["error"], f"{what}: {resp.json()['error']}"
        after = infer(url, good, "/v2/models/digits/versions/1/infer")
        assert after.status_code == 200, f"after {what}: {after.text}"
    assert requests.get(f"{url}/v2/models/digits/versions/1/infer", timeout=10).status_code == 405
    assert requests.get(f"{url}/v2/nothing-here", timeout=10).status_code == 404


def test_two_versions_served_at_once_each_reachable(served, predictors):
    url = served["url"]
    x = digits_raw(16)
    answers = {}
    for version, key in (("1", "fp32-cnn"), ("2", "digits-v2")):
        resp = infer(url, oip_body("image", x), f"/v2/models/digits/versions/{version}/infer")
        assert resp.status_code == 200 and resp.json()["model_version"] == version
        probs = np.asarray(resp.json()["outputs"][0]["data"], np.float32).reshape(-1, 10)
        np.testing.assert_allclose(probs, predictors[key].predict_proba(x), atol=1e-5)
        answers[version] = probs
    assert not np.allclose(answers["1"], answers["2"], atol=1e-3)  # really two different models
    unversioned = infer(url, oip_body("image", x), "/v2/models/digits/infer")
    assert unversioned.json()["model_version"] == "2"  # the default: the highest version served


def test_concurrent_requests_are_batched_and_answered_correctly(served, predictors):
    """Many clients at once: every response matches its own input (batches are split back
    correctly)."""
    from concurrent.futures import ThreadPoolExecutor

    url = served["url"]
    x = digits_raw(32)
    expected = predictors["fp32-cnn"].predict_proba(x)

    def one(i: int) -> np.ndarray:
        resp = infer(url, oip_body("image", x[i : i + 1]), "/v2/models/digits/versions/1/infer")
        assert resp.status_code == 200, resp.text
        return np.asarray(resp.json()["outputs"][0]["data"], np.float32)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(len(x))))
    np.testing.assert_allclose(np.stack(got), expected, atol=1e-5)


def scrape(metrics_url: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(metrics_url, timeout=10).text
    return [
        s
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("ray_kiln_")
    ]


def test_metrics_per_version(served):
    """requests, errors, latency histogram and batch sizes, labelled by model and version."""
    url = served["url"]
    good = oip_body("image", digits_raw(3))
    for version in ("1", "2"):
        assert infer(url, good, f"/v2/models/digits/versions/{version}/infer").status_code == 200
    assert infer(url, good, "/v2/models/digits/versions/1/infer", headers={}).status_code == 401

    def value(samples, name, **labels):
        return sum(
            s.value
            for s in samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def exported() -> list | None:  # the samples, once both versions and the 401 are exported
        samples = scrape(served["metrics_url"])
        seen = {
            (s.labels.get("model"), s.labels.get("model_version"))
            for s in samples
            if s.name == "ray_kiln_requests_total"
        }
        if {("digits", "1"), ("digits", "2")} <= seen and value(
            samples, "ray_kiln_request_errors_total", model="digits", code="401"
        ) >= 1:
            return samples
        return None

    samples = wait_until(exported, 90, "metrics of both versions and the 401", max_interval=2.0)
    for version in ("1", "2"):
        assert (
            value(
                samples,
                "ray_kiln_requests_total",
                model="digits",
                model_version=version,
                endpoint="infer",
            )
            >= 1
        )
        assert (
            value(
                samples, "ray_kiln_request_latency_ms_count", model="digits", model_version=version
            )
            >= 1
        )
        assert (
            value(samples, "ray_kiln_batch_size_count", model="digits", model_version=version) >= 1
        )
        assert value(samples, "ray_kiln_batch_size_sum", model="digits", model_version=version) >= 3
    assert (
        value(
            samples, "ray_kiln_request_errors_total", model="digits", model_version="1", code="401"
        )
        >= 1
    )


def test_status_shows_models_and_counts(served, ray_cluster, registry):
    proc = run_kiln(
        "serve", "status", "--address", ray_cluster, "--run-dir", str(registry.run_dir), "--json"
    )
    assert proc.returncode == 0, proc.stderr
    status = last_json(proc.stdout)
    assert status["url"] == served["url"]
    assert {name: app["status"] for name, app in status["applications"].items()} == {
        "kiln": "RUNNING",
        **{f"kiln-{v.served_name}": "RUNNING" for v in VARIANTS.values()},
    }
    assert {(m["name"], m["version"]) for m in status["models"]} == served_versions(registry)


def test_second_start_is_refused_while_serving(served, ray_cluster, registry):
    proc = run_kiln(
        *serve_args(ray_cluster, registry, registry.uris["fp32-cnn"]), env=kiln_env(registry)
    )
    assert proc.returncode == 2
    assert (
        "Kiln is already serving on the Ray cluster" in proc.stderr
        and "kiln serve stop" in proc.stderr
    )


@pytest.mark.ends_module  # it stops the module's app: the others would start it again
def test_stop_removes_the_app(served, ray_cluster, registry):
    proc = run_kiln(
        "serve", "stop", "--address", ray_cluster, "--run-dir", str(registry.run_dir), "--json"
    )
    assert proc.returncode == 0, proc.stderr
    assert last_json(proc.stdout)["stopped"] == sorted(
        {"kiln", *(f"kiln-{v.served_name}" for v in VARIANTS.values())}
    )
    with pytest.raises(
        requests.exceptions.ConnectionError
    ):  # no app left: Serve itself was shut down
        infer(served["url"], oip_body("image", digits_raw(1)), "/v2/models/digits/versions/1/infer")
    again = run_kiln("serve", "stop", "--address", ray_cluster, "--run-dir", str(registry.run_dir))
    assert again.returncode == 2 and "Kiln serves nothing" in again.stderr


# --- hostile input: budgets before work, never a 5xx ---------------------------------------------

HOSTILE_S = (
    10.0  # generous: each is refused in milliseconds; before the budgets, seconds to minutes
)
RSS_GROWTH_BYTES = 400 << 20  # a decoded PNG bomb alone was hundreds of MB


def strict_json(text: str):
    """The body parsed as strict JSON (NaN and Infinity are not JSON)."""

    def refuse(constant: str):
        raise ValueError(f"non-JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def replica_rss(address: str) -> dict[str, int]:
    """Resident memory of each of Kiln's serve replicas on this machine (Ray's state API, /proc)."""
    out = {}
    for name, pid in replica_pids(address).items():
        status = Path(f"/proc/{pid}/status")
        for line in status.read_text().splitlines() if status.exists() else []:
            if line.startswith("VmRSS:"):
                out[name] = int(line.split()[1]) * 1024
    return out


def hostile_requests() -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(what, path, body, extra headers): one per class of hostile input, each under the app's
    64 KiB body limit."""
    from served_models import png_bomb, png_header_only

    digits, iris = "/v2/models/digits/versions/1", "/v2/models/iris"

    def oip(shape, data, datatype="UINT8") -> bytes:
        return json.dumps(
            {"inputs": [{"name": "input", "datatype": datatype, "shape": shape, "data": data}]}
        ).encode()

    def image(data: bytes) -> bytes:
        return json.dumps({"images": [base64.b64encode(data).decode()]}).encode()

    nan = np.array([np.nan] * 4, np.float32).tobytes()
    nan_header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 4],
                    "parameters": {"binary_data_size": len(nan)},
                }
            ]
        }
    ).encode()
    return [
        ("shape of many small dims", f"{digits}/infer", oip([2] * 20_000, [0]), {}),
        ("more dims than numpy allows", f"{digits}/infer", oip([1] * 40, [0]), {}),
        ("elements beyond memory", f"{digits}/infer", oip([1, 2**31, 2**31], [0]), {}),
        ("rows over the budget", f"{iris}/infer", oip([5000, 4], [0.0], "FP32"), {}),
        ("JSON nested 30000 deep", f"{digits}/infer", b"[" * 30_000 + b"]" * 30_000, {}),
        ("integer of 60000 digits", f"{digits}/infer", b"[" + b"7" * 60_000 + b"]", {}),
        ("NaN literal", f"{iris}/infer", oip([1, 4], [float("nan")] * 4, "FP32"), {}),
        ("Infinity literal", f"{iris}/predict", b'{"records": [{"a": Infinity}]}', {}),
        ("integer overflowing INT64", f"{iris}/infer", oip([1, 4], [2**70] * 4, "INT64"), {}),
        ("FP16 overflow", f"{iris}/infer", oip([1, 4], [1e10] * 4, "FP16"), {}),
        ("FP64 beyond FP32", f"{iris}/infer", oip([1, 4], [1e300] * 4, "FP64"), {}),
        ("binary NaN", f"{iris}/infer", nan_header + nan, {HEADER: str(len(nan_header))}),
        ("PNG bomb (real, 6000x6000)", f"{digits}/predict", image(png_bomb(6000)), {}),
        (
            "PNG header of 10^10 pixels",
            f"{digits}/predict",
            image(png_header_only(10**5, 10**5)),
            {},
        ),
        ("GIF instead of PNG/JPEG", f"{digits}/predict", image(b"GIF89a" + b"\0" * 64), {}),
        (
            "records with thousands of keys",
            f"{iris}/predict",
            json.dumps(
                {"records": [{f"k{i}": i for i in range(4000)}]}, separators=(",", ":")
            ).encode(),
            {},
        ),
        (
            "many records of distinct keys",
            f"{iris}/predict",
            json.dumps(
                {"records": [{f"k{i}": 1} for i in range(4500)]}, separators=(",", ":")
            ).encode(),
            {},
        ),
    ]


HEADER = "Inference-Header-Content-Length"


def test_each_class_of_hostile_input_is_4xx_fast_memory_bounded_and_the_next_request_served(
    served, ray_cluster
):
    url = served["url"]
    good = oip_body("image", digits_raw(2))
    before = replica_rss(ray_cluster)
    assert before, "no Kiln replica found through Ray's state API"
    for what, path, body, extra in hostile_requests():
        assert len(body) <= MAX_BODY, what
        started = time.perf_counter()
        resp = requests.post(f"{url}{path}", data=body, headers={**HEADERS, **extra}, timeout=120)
        elapsed = time.perf_counter() - started
        assert 400 <= resp.status_code < 500, f"{what}: {resp.status_code} {resp.text[:300]}"
        assert "error" in strict_json(resp.text), what
        assert elapsed < HOSTILE_S, f"{what}: answered after {elapsed:.1f} s"
        after = infer(url, good, "/v2/models/digits/versions/1/infer")
        assert after.status_code == 200, f"after {what}: {after.text}"
    grown = {name: rss - before.get(name, rss) for name, rss in replica_rss(ray_cluster).items()}
    assert max(grown.values()) < RSS_GROWTH_BYTES, grown


def test_the_api_key_is_in_no_replica_environment(served, ray_cluster):
    """Replicas get the key's sha256 only: the key itself is in no replica's environment."""
    pids = list(replica_pids(ray_cluster).values())
    assert pids
    for pid in pids:
        assert API_KEY.encode() not in Path(f"/proc/{pid}/environ").read_bytes(), pid


def test_limits_name_their_config_key(served):
    url = served["url"]
    resp = infer(url, b"[" * 1000 + b"]" * 1000, "/v2/models/digits/infer")
    assert resp.status_code == 413 and "serve.limits.max_json_depth" in resp.json()["error"]


# --- property-based fuzzing from the published OpenAPI document ----------------------------------

FUZZ_EXAMPLES = 10  # per operation and generation mode: fixed, so the test is bounded
FUZZ_SEED = 14


@pytest.mark.slow  # about a minute: a few hundred generated requests
def test_fuzz_the_published_api_never_5xx_never_invalid_json(served, ray_cluster, capsys):
    """Requests generated by schemathesis from docs/openapi.json (valid and invalid per the
    document, seeded) and by hypothesis (raw bytes, arbitrary JSON) against every endpoint: zero
    5xx, every body strict JSON (or the binary protocol's header), the server answering a good
    request after each batch, replica memory bounded."""
    import schemathesis
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    from kiln.serve.openapi import openapi_document

    url = served["url"]
    document = json.loads((REPO / "docs" / "openapi.json").read_text())
    assert document == openapi_document(version=document["info"]["version"]), (
        "docs/openapi.json is stale: python -m kiln.serve.openapi > docs/openapi.json"
    )
    served_names = sorted({name for name, _ in served_versions_of(served)})
    schema = schemathesis.openapi.from_dict(openapi_document(served_names))
    good = oip_body("image", digits_raw(2))
    tried: Counter = Counter()
    failures: list[str] = []
    before = replica_rss(ray_cluster)

    def check(label: str, resp: requests.Response) -> None:
        tried[label] += 1
        if resp.status_code >= 500:
            failures.append(f"{label}: {resp.status_code} {resp.text[:200]}")
            return
        text = resp.text
        if resp.headers.get(HEADER):  # binary tensor data: the JSON header comes first
            text = resp.content[: int(resp.headers[HEADER])].decode()
        try:
            strict_json(text)
        except ValueError as exc:
            failures.append(f"{label}: not strict JSON ({exc}): {text[:200]}")

    def alive(after: str) -> None:
        resp = infer(url, good, "/v2/models/digits/infer")
        assert resp.status_code == 200, f"after {after}: {resp.status_code} {resp.text[:200]}"

    fuzz = settings(
        max_examples=FUZZ_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )

    def cases(operation, mode):
        """The seeded, bounded run of one operation in one generation mode."""

        @fuzz
        @seed(FUZZ_SEED)
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            check(operation.label, case.call(base_url=url, headers=dict(HEADERS), timeout=60))

        return run

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                cases(operation, mode)()
            except Unsatisfiable:  # nothing to make invalid (no body, no parameter)
                assert mode is GenerationMode.NEGATIVE, operation.label
            alive(f"{operation.label} ({mode.value})")

    paths = [
        f"/v2/models/{name}/{action}" for name in served_names for action in ("infer", "predict")
    ]
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=30,
    )
    bodies = st.one_of(
        st.binary(max_size=2048),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {
                "inputs": st.lists(
                    st.dictionaries(
                        st.sampled_from(["name", "shape", "datatype", "data", "parameters"]),
                        json_values,
                    ),
                    max_size=3,
                )
            }
        ).map(lambda v: json.dumps(v).encode()),
    )

    @fuzz
    @seed(FUZZ_SEED)
    @given(path=st.sampled_from(paths), body=bodies, header=st.none() | st.integers(-5, 4096))
    def raw(path, body, header) -> None:
        headers = dict(HEADERS) if header is None else {**HEADERS, HEADER: str(header)}
        check(
            f"POST {path} (raw)",
            requests.post(f"{url}{path}", data=body, headers=headers, timeout=60),
        )

    for _ in range(4):  # 4 batches of raw bodies, the server checked after each
        raw()
        alive("raw bodies")
    grown = {name: rss - before.get(name, rss) for name, rss in replica_rss(ray_cluster).items()}
    with capsys.disabled():
        print(
            f"\nfuzz: {sum(tried.values())} requests over {len(tried)} operations, "
            f"{len(failures)} failures, replica RSS growth {max(grown.values()) >> 20} MiB"
        )
    assert not failures, "\n".join(failures[:20])
    assert sum(tried.values()) >= 14 * FUZZ_EXAMPLES
    assert max(grown.values()) < RSS_GROWTH_BYTES, grown


def served_versions_of(served: dict) -> set[tuple[str, str]]:
    """(served name, version) pairs of the running app, from its listing."""
    listing = requests.get(f"{served['url']}/v2/models", timeout=10).json()
    return {(m["name"], v) for m in listing["models"] for v in m["versions"]}
