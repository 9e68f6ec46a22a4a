"""Builders, the artifact format (safetensors + spec JSON, no pickles) and the predict API on every
input form."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from kiln.data.config import DataConfig
from kiln.data.dataset import prepare_data
from kiln.models.artifact import artifact_size, build_model, load_torch_model, save_artifact
from kiln.models.builders import count_parameters
from kiln.models.predictor import load_predictor
from kiln.schema import KilnConfig
from kiln.train.loop import model_spec


@pytest.mark.parametrize(
    "name, shape",
    [
        ("mlp", [20]),
        ("mlp", [1, 8, 8]),
        ("cnn", [1, 8, 8]),
        ("cnn", [3, 28, 28]),
        ("resnet18", [1, 28, 28]),
        ("resnet18", [3, 96, 96]),
    ],
)
def test_builders_take_their_input_and_output_logits(name, shape):
    from kiln.models.registry import resolve_builder

    model = resolve_builder(name)(shape, 7).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, *shape))
    assert out.shape == (2, 7)


def test_resnet18_has_no_pretrained_weights_and_adapts_channels():
    from kiln.models.builders import build_resnet18

    m = build_resnet18([1, 32, 32], 10)
    assert m.conv1.in_channels == 1 and m.fc.out_features == 10
    assert 11_000_000 < count_parameters(m) < 11_300_000


def test_custom_factory_by_import_path():
    cfg = KilnConfig.model_validate({"model": {"name": "torchvision.models:mobilenet_v3_small"}})
    assert cfg.model.name == "torchvision.models:mobilenet_v3_small"


@pytest.fixture(scope="module")
def digits(ray_cluster):  # data is read in Ray Data tasks
    return prepare_data(DataConfig(source="digits", image="image"))


def test_artifact_round_trip_without_pickles(tmp_path, digits):
    cfg = KilnConfig.model_validate({"model": {"name": "cnn", "width": 8}})
    spec = model_spec(cfg, digits)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    save_artifact(model, spec, tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["MLmodel", "model.safetensors", "spec.json"]
    spec_json = json.loads((tmp_path / "m/spec.json").read_text())
    assert spec_json["labels"] == list(range(10)) and spec_json["format"] == "safetensors"
    # safetensors files start with an 8-byte header length and JSON: no pickle opcodes anywhere
    raw = (tmp_path / "m/model.safetensors").read_bytes()
    assert raw[8:9] == b"{" and b"\x80\x04" not in raw[:64]
    loaded, _ = load_torch_model(tmp_path / "m")
    x = torch.from_numpy(digits.x_test[:16])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert artifact_size(tmp_path / "m") > (tmp_path / "m/model.safetensors").stat().st_size


def test_predictor_accepts_arrays_bytes_and_pil(tmp_path, digits):
    from PIL import Image

    from kiln.data.builtin import load_builtin

    cfg = KilnConfig.model_validate({"model": {"name": "cnn", "width": 8}})
    spec = model_spec(cfg, digits)
    save_artifact(build_model(spec).eval(), spec, tmp_path / "m")
    pred = load_predictor(tmp_path / "m")
    table = load_builtin("digits").slice(0, 5)
    encoded = [cell["bytes"] for cell in table.column("image").to_pylist()]
    by_bytes = pred.predict(encoded)
    pil = [Image.open(io.BytesIO(b)) for b in encoded]
    arrays = np.stack([np.asarray(p) for p in pil])
    assert pred.predict(pil) == by_bytes == pred.predict(arrays) == pred.predict(arrays[:, None])
    probs = pred.predict_proba(encoded)
    assert probs.shape == (5, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert all(label in range(10) for label in by_bytes)


def test_predictor_rejects_wrong_shapes(tmp_path, digits):
    from kiln.models.inputs import InputError

    cfg = KilnConfig.model_validate({"model": {"name": "mlp"}})
    spec = model_spec(cfg, digits)
    save_artifact(build_model(spec).eval(), spec, tmp_path / "m")
    pred = load_predictor(tmp_path / "m")
    with pytest.raises(InputError, match="does not match"):
        pred.predict(np.zeros((2, 9, 9), np.uint8))
    with pytest.raises(InputError, match="does not decode"):
        pred.predict([b"garbage"])


def test_unknown_model_uri_is_a_model_error(tmp_path):
    from kiln.errors import ModelError

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ModelError, match="unknown model 'models:/nope/1'"):
        load_predictor("models:/nope/1", tracking_uri=uri)
