"""serve.limits: every class of hostile request body is refused with a 4xx naming its budget, before
the work it would cause (no Ray: the protocol and served-version functions the ingress calls).

Each case is bounded in time (a generous bound, far below the seconds-to-minutes the same bodies
cost before the budgets), so a regression that does the work before the check fails here.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time

import numpy as np
import pytest

from kiln.serve.limits import LimitError, LimitsConfig, check_json_depth
from kiln.serve.protocol import CLIENT_ERRORS, ProtocolError, load_json, parse_infer_request
from served_models import png_bomb, png_header_only

FAST_S = 2.0  # every refusal below takes milliseconds; the bound only catches work done first


def refused(call, status: int, match: str):
    started = time.perf_counter()
    with pytest.raises(CLIENT_ERRORS) as err:
        call()
    elapsed = time.perf_counter() - started
    assert err.value.status == status, str(err.value)
    assert match in str(err.value), str(err.value)
    assert elapsed < FAST_S, f"refused after {elapsed:.1f} s: the work came before the check"
    return err.value


def body(inputs: list[dict], **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def tensor(shape, data, datatype="FP32", name="input") -> dict:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


# --- JSON ----------------------------------------------------------------------------------------


def test_json_nested_thousands_deep_is_refused_before_parsing():
    deep = b"[" * 200_000 + b"]" * 200_000
    refused(lambda: load_json(deep), 413, "serve.limits.max_json_depth")
    inside_strings = json.dumps({"inputs": ["[" * 10_000]}).encode()  # brackets in a string
    check_json_depth(inside_strings, LimitsConfig())


def test_number_literals_of_thousands_of_digits_are_refused():
    refused(lambda: load_json(b"[" + b"9" * 100_000 + b"]"), 413, "serve.limits.max_number_chars")
    refused(lambda: load_json(b"[1." + b"1" * 5_000 + b"]"), 413, "max_number_chars")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_numbers_are_refused_on_input(literal):
    refused(lambda: load_json(b"[" + literal + b"]"), 400, "not valid JSON")


# --- OIP tensors ---------------------------------------------------------------------------------


def test_a_very_long_shape_is_refused_before_its_product_is_computed():
    # The product of 200,000 twos is a 200,000-bit integer, built by ever larger multiplications:
    # seconds to minutes of work before the budgets; the body itself parses in milliseconds.
    shape = [2] * 200_000
    refused(
        lambda: parse_infer_request(body([tensor(shape, [1.0])])),
        413,
        "serve.limits.max_dims",
    )


@pytest.mark.parametrize(
    "shape, key",
    [
        ([2**40, 2**40], "max_rows"),
        ([1, 2**40, 2**40], "max_elements"),
        ([4097, 1], "max_rows"),
        ([1] * 9, "max_dims"),
    ],
)
def test_shapes_over_a_budget_are_413(shape, key):
    refused(lambda: parse_infer_request(body([tensor(shape, [1.0])])), 413, key)


def test_a_zero_sized_shape_is_not_over_the_element_budget():
    req = parse_infer_request(body([tensor([0, 2**40], [])]))
    assert req.inputs[0].data.size == 0


def test_integers_that_overflow_the_datatype_are_400():
    refused(
        lambda: parse_infer_request(body([tensor([1], [2**70], "INT64")])),
        400,
        "must hold numbers",
    )
    refused(
        lambda: parse_infer_request(body([tensor([1], [70000], "UINT16")])),
        400,
        "outside the range of UINT16",
    )
    refused(
        lambda: parse_infer_request(body([tensor([1], [1e10], "FP16")])),
        400,
        "outside the range of FP16",
    )


def test_binary_nan_and_infinity_are_refused():
    raw = np.array([np.nan, np.inf], np.float32).tobytes()
    header = json.dumps(
        {"inputs": [{**tensor([2], None), "parameters": {"binary_data_size": len(raw)}}]}
    ).encode()
    header = header.replace(b',"data":null', b"")
    refused(lambda: parse_infer_request(header + raw, str(len(header))), 400, "NaN, Infinity")


def test_strings_over_the_budget_are_413():
    limits = LimitsConfig(max_string_bytes=1024)
    refused(
        lambda: parse_infer_request(body([tensor([1], ["x" * 2000], "BYTES")]), limits=limits),
        413,
        "serve.limits.max_string_bytes",
    )
    item = b"y" * 2000
    raw = struct.pack("<I", len(item)) + item
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    refused(
        lambda: parse_infer_request(header + raw, str(len(header)), limits),
        413,
        "max_string_bytes",
    )


def test_a_long_request_id_is_400():
    refused(lambda: parse_infer_request(body([tensor([1], [1.0])], id="x" * 10_000)), 400, "'id'")


# --- served versions: images and records ---------------------------------------------------


@pytest.fixture
def served_image():
    from kiln.data.preprocess import Preprocessing
    from kiln.models.predictor import Predictor
    from kiln.models.spec import ModelSpec
    from kiln.serve.versions import ServedVersion

    prep = Preprocessing(kind="image", mean=[0.5], std=[0.25], channels=1, image_size=[8, 8])
    spec = ModelSpec("cnn", {}, [1, 8, 8], labels=[3, 5], preprocessing=prep)
    predictor = Predictor(spec, lambda x: np.zeros((len(x), 2), np.float32), "test")
    return ServedVersion("digits", "1", predictor, LimitsConfig(max_image_pixels=1 << 20))


@pytest.fixture
def served_table():
    from kiln.data.preprocess import Preprocessing
    from kiln.models.predictor import Predictor
    from kiln.models.spec import ModelSpec
    from kiln.serve.versions import ServedVersion

    prep = Preprocessing(kind="tabular", mean=[0.0, 0.0], std=[1.0, 1.0], feature_names=["a", "b"])
    spec = ModelSpec("mlp", {}, [2], labels=["x", "y"], preprocessing=prep)
    predictor = Predictor(spec, lambda x: np.zeros((len(x), 2), np.float32), "test")
    return ServedVersion("iris", "1", predictor, LimitsConfig(max_rows=100, max_record_keys=8))


def png_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "image, status, match",
    [
        (png_header_only(100_000, 100_000), 413, "max_image_pixels"),  # Pillow's bomb error
        (png_header_only(2000, 2000), 413, "image of 2000x2000 pixels"),
        (b"GIF89a" + b"\x00" * 100, 400, "does not decode as an image (send PNG or JPEG)"),
    ],
)
def test_images_are_checked_from_their_header_before_decoding(served_image, image, status, match):
    from kiln.serve.protocol import Tensor

    refused(lambda: served_image.prepare_json({"images": [png_b64(image)]}), status, match)
    items = np.empty(1, dtype=object)
    items[0] = image
    refused(
        lambda: served_image.prepare_tensors([Tensor("input", "BYTES", [1], items)]),
        status,
        match,
    )


def test_a_real_png_bomb_is_refused_without_decoding(served_image):
    bomb = png_bomb(4000)  # 16 MP, about 16 KB on the wire
    assert len(bomb) < 100_000
    refused(lambda: served_image.prepare_json({"images": [png_b64(bomb)]}), 413, "4000x4000")


def test_a_good_png_still_decodes(served_image):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 200).save(buf, format="PNG")
    assert served_image.prepare_json({"images": [png_b64(buf.getvalue())]}).shape == (1, 1, 8, 8)


def test_records_are_bounded_in_rows_and_keys_and_read_for_the_features_only(served_table):
    many_keys = [{f"k{i}": i for i in range(10)} | {"a": 1, "b": 2}]
    refused(lambda: served_table.prepare_json({"records": many_keys}), 413, "max_record_keys")
    rows = [{"a": 1, "b": 2}] * 101
    refused(lambda: served_table.prepare_json({"records": rows}), 413, "serve.limits.max_rows")
    refused(
        lambda: served_table.prepare_json({"records": [{"a": "1", "b": 2}]}),
        400,
        "must be a number or null",
    )
    refused(
        lambda: served_table.prepare_json({"records": [{"a": 1e39, "b": 2}]}),
        400,
        "outside the range of FP32",
    )
    x = served_table.prepare_json({"records": [{"a": 1, "b": None, "extra": "ignored"}]})
    assert x.shape == (1, 2) and np.isfinite(x).all()


def test_tabular_values_beyond_fp32_are_400(served_table):
    from kiln.serve.protocol import Tensor

    data = np.array([[1e300, 0.0]], np.float64)
    refused(
        lambda: served_table.prepare_tensors([Tensor("input", "FP64", [1, 2], data)]),
        400,
        "outside the range of FP32",
    )


def test_the_limits_section_has_safe_defaults_and_validates():
    from kiln.serve.config import ServeConfig

    cfg = ServeConfig.model_validate({"limits": {"max_rows": 10}})
    assert cfg.limits.max_rows == 10 and cfg.limits.max_json_depth == 32
    with pytest.raises(ValueError):
        ServeConfig.model_validate({"limits": {"max_json_depth": 0}})
    with pytest.raises(ValueError):
        ServeConfig.model_validate({"limits": {"max_tensors": 1}})


def test_limit_errors_are_client_errors():
    assert issubclass(LimitError, Exception) and LimitError in CLIENT_ERRORS
    assert ProtocolError in CLIENT_ERRORS


# --- the replica's side: parsing off the event loop, bounded model calls -------------------------


def test_large_bodies_are_parsed_off_the_event_loop():
    import asyncio
    import threading

    from kiln.serve.limits import OFFLOAD_BYTES
    from kiln.serve.model_server import off_loop

    async def where(size: int) -> str:
        return await off_loop(lambda: threading.current_thread().name, size)

    main = threading.current_thread().name
    assert asyncio.run(where(OFFLOAD_BYTES)) == main  # small: no thread hop
    assert asyncio.run(where(OFFLOAD_BYTES + 1)) != main


def test_a_dynamic_batch_runs_in_calls_of_at_most_max_batch_rows(served_table):
    from kiln.serve.model_server import VersionRunner

    calls: list[int] = []

    def runtime(x):
        calls.append(len(x))
        return np.zeros((len(x), 2), np.float32)

    served_table.predictor.runtime = runtime
    served_table.limits = LimitsConfig(max_batch_rows=64)

    class Metrics:
        def batch(self, *args) -> None:
            pass

    runner = VersionRunner(served_table, Metrics())
    out = runner._call(np.zeros((200, 2), np.float32))  # what a batch of joined requests holds
    assert out.shape == (200, 2) and max(calls) == 64 and sum(calls) == 200


def test_non_finite_model_output_is_422_not_invalid_json():
    from kiln.serve.model_server import finite

    refused(lambda: finite(np.array([[np.nan, 0.0]], np.float32)), 422, "not finite")
    assert finite(np.zeros((1, 2), np.float32)).shape == (1, 2)
