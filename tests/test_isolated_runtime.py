"""A model's runtime in its own process (kiln.models.isolated_runtime), without Ray: it answers as
the in-process runtime does, a model error leaves it running, and a model that aborts its process
(tests/crash_models.py) fails its own calls with the cause while this process goes on."""

from __future__ import annotations

import os

import numpy as np
import pytest

from crash_models import ALLOW, ARCHITECTURE, is_poison, poison_image


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A digits-shaped CNN artifact under the crashing builder (random weights)."""
    import torch

    from crash_models import crashing_cnn
    from kiln.data.preprocess import Preprocessing
    from kiln.models.artifact import save_artifact
    from kiln.models.spec import ModelSpec

    torch.manual_seed(0)
    prep = Preprocessing(kind="image", mean=[0.3], std=[0.4], channels=1, image_size=[8, 8])
    spec = ModelSpec(ARCHITECTURE, {"width": 4}, [1, 8, 8], list(range(10)), prep)
    directory = tmp_path_factory.mktemp("isolated") / "model"
    save_artifact(crashing_cnn([1, 8, 8], 10, width=4).eval(), spec, directory)
    return directory


@pytest.fixture
def allowed(monkeypatch):
    monkeypatch.setenv("KILN_ALLOWED_BUILDERS", ALLOW)


def test_poison_is_only_the_poison_image():
    from kiln.data.preprocess import Preprocessing

    prep = Preprocessing(kind="image", mean=[0.3], std=[0.4], channels=1, image_size=[8, 8])
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, (16, 1, 8, 8), dtype=np.uint8)
    assert is_poison(prep.apply(poison_image()[None]))
    assert not is_poison(prep.apply(digits))
    assert not is_poison(np.zeros((2, 1, 8, 8), np.float32))  # a rollout's smoke request
    assert is_poison(prep.apply(np.concatenate([digits, poison_image()[None]])))


def test_isolated_runtime_answers_like_the_in_process_one_and_survives_model_errors(
    artifact, allowed
):
    from kiln.errors import ModelError
    from kiln.models.predictor import load_isolated_predictor, load_predictor

    local = load_predictor(artifact)
    isolated = load_isolated_predictor(artifact, "test-artifact")
    try:
        x = np.random.default_rng(1).standard_normal((5, 1, 8, 8)).astype(np.float32)
        assert np.allclose(isolated.logits(x), local.logits(x), atol=1e-5)
        with pytest.raises(ModelError, match="test-artifact: ValueError"):
            isolated.logits(np.zeros((1, 2, 3), np.float32))  # wrong shape: the model raises
        assert np.allclose(isolated.logits(x[:2]), local.logits(x[:2]), atol=1e-5)
        assert isolated.runtime.pid != os.getpid()
    finally:
        isolated.close()


def test_a_model_that_aborts_fails_its_own_calls_with_the_cause(artifact, allowed):
    from kiln.models.isolated_runtime import RuntimeProcessDied
    from kiln.models.predictor import load_isolated_predictor

    isolated = load_isolated_predictor(artifact, "test-artifact")
    prep = isolated.spec.preprocessing
    try:
        with pytest.raises(RuntimeProcessDied, match="its process killed by SIGABRT"):
            isolated.logits(prep.apply(poison_image()[None]))
        with pytest.raises(RuntimeProcessDied, match="SIGABRT"):  # at once: no process to ask
            isolated.logits(np.zeros((1, 1, 8, 8), np.float32))
    finally:
        isolated.close()


def test_a_builder_not_allowed_is_refused_before_a_process_starts(artifact, monkeypatch):
    from kiln.errors import ModelError
    from kiln.models.predictor import load_isolated_predictor

    monkeypatch.delenv("KILN_ALLOWED_BUILDERS", raising=False)
    with pytest.raises(ModelError, match="is not an allowed builder"):
        load_isolated_predictor(artifact, "test-artifact")
