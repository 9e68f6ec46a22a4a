"""The one register_artifact (kiln.models.registration), against a real MLflow sqlite store, no Ray:
what train, tune, compress and the test helpers rely on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln import tracking as trk
from kiln.data.preprocess import Preprocessing
from kiln.errors import ModelError
from kiln.models.artifact import build_model, save_artifact
from kiln.models.registration import copy_artifact, register_artifact
from kiln.models.spec import ModelSpec


def tiny_artifact(directory: Path) -> Path:
    """A tiny MLP artifact (spec.json, model.safetensors, MLmodel) plus a checkpoint's extras."""
    spec = ModelSpec(
        architecture="mlp",
        kwargs={"hidden": [4]},
        input_shape=[3],
        labels=["a", "b"],
        preprocessing=Preprocessing(kind="tabular", mean=[0.0] * 3, std=[1.0] * 3),
    )
    save_artifact(build_model(spec), spec, directory)
    (directory / "optimizer.pt").write_bytes(b"not part of the model")
    (directory / "state.json").write_text(json.dumps({"epoch": 0, "metrics": {}}))
    return directory


def test_copy_artifact_takes_the_model_files_and_leaves_training_state(tmp_path):
    checkpoint = tiny_artifact(tmp_path / "checkpoint")
    copied = copy_artifact(checkpoint, tmp_path / "model")
    assert sorted(p.name for p in copied.iterdir()) == ["MLmodel", "model.safetensors", "spec.json"]
    with pytest.raises(ModelError):
        copy_artifact(tmp_path / "nothing-here", tmp_path / "other")


def test_register_artifact_logs_tags_and_closes_the_run(tmp_path):
    uri = trk.default_tracking_uri(tmp_path)
    exp = trk.ensure_experiment(uri, "reg", tmp_path)
    run_id = trk.start_run(uri, exp, "reg-run", {})
    model_dir = copy_artifact(tiny_artifact(tmp_path / "ckpt"), tmp_path / "model")

    def reference(directory: Path) -> None:
        (directory / "monitor_reference.json").write_text("{}")

    registration = register_artifact(
        uri,
        "reg",
        run_id,
        model_dir,
        tags={"kiln.variant": "fp32"},
        test_metrics={"test_accuracy": 0.91234, "test_f1_macro": 0.9},
        write_reference=reference,
        metrics={"size_bytes": 123.0},
        run_tags={"kiln.storage_path": "/somewhere"},
        description="a test version",
        finish_run=True,
    )
    assert registration.uri == f"models:/reg/{registration.version}"
    assert registration.test_metrics == {"test_accuracy": 0.91234, "test_f1_macro": 0.9}
    version = trk.model_version_for(uri, registration.uri)
    assert version.tags == {"kiln.variant": "fp32", "test_accuracy": "0.9123"}
    assert version.description == "a test version" and version.run_id == run_id
    run = trk.get_run(uri, run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["kiln.model_version"] == registration.version
    assert run.data.tags["kiln.storage_path"] == "/somewhere"
    assert run.data.metrics == {"test_accuracy": 0.91234, "test_f1_macro": 0.9, "size_bytes": 123.0}
    logged = {a.path for a in trk.client(uri).list_artifacts(run_id, trk.MODEL_ARTIFACT_PATH)}
    assert logged == {
        "model/MLmodel",
        "model/model.safetensors",
        "model/spec.json",
        "model/monitor_reference.json",  # written before the folder was logged
    }


def test_register_artifact_without_evaluation_tags_only_what_it_is_given(tmp_path):
    uri = trk.default_tracking_uri(tmp_path)
    exp = trk.ensure_experiment(uri, "plain", tmp_path)
    run_id = trk.start_run(uri, exp, "plain-run", {})
    model_dir = copy_artifact(tiny_artifact(tmp_path / "ckpt"), tmp_path / "model")
    registration = register_artifact(uri, "plain", run_id, model_dir, tags={"kiln.variant": "x"})
    assert trk.model_version_for(uri, registration.uri).tags == {"kiln.variant": "x"}
    run = trk.get_run(uri, run_id)
    assert run.info.status == "RUNNING"  # the caller closes it (tune closes its child runs itself)
    assert run.data.metrics == {}
