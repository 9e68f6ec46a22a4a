"""The one register_artifact (kiln.models.registration), against a real MLflow sqlite store, no Ray:
what train, tune, compress and the test helpers rely on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kiln import tracking as trk
from kiln.data.preprocess import Preprocessing
from kiln.data.profile import build_profile
from kiln.errors import ModelError
from kiln.models.artifact import build_model, save_artifact
from kiln.models.card import PROFILE_ARTIFACT, split_lines
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


def test_every_registration_stores_its_model_card(tmp_path):
    """The card is stored on the version's run at registration; a variant's card (compress's tags:
    parent, kind, name, params, size, accuracy) names its parent, the steps from the reference and
    its size and accuracy against the reference."""
    from kiln.models.card import model_card

    uri = trk.default_tracking_uri(tmp_path)
    exp = trk.ensure_experiment(uri, "card", tmp_path)

    def register(tags: dict, name: str) -> str:
        run_id = trk.start_run(uri, exp, name, {trk.TAG_JOB: "test"})
        if name == "ref":  # as kiln train logs it: the data's profile, rows per split included
            profile = build_profile(
                source="animals.parquet",
                kind="tabular",
                dataset_hash="abc",
                labels=["a", "b"],
                class_counts=np.array([[600, 200], [150, 50], [75, 25]]),
                features=[],
                images={},
                leakage={},
                sampling={},
            )
            (tmp_path / PROFILE_ARTIFACT).write_text(json.dumps(profile.to_dict()))
            trk.log_artifact(uri, run_id, tmp_path / PROFILE_ARTIFACT)
        model_dir = copy_artifact(tiny_artifact(tmp_path / f"ckpt-{name}"), tmp_path / name)
        version = register_artifact(uri, "card", run_id, model_dir, tags=tags, finish_run=True)
        logged = {a.path for a in trk.client(uri).list_artifacts(run_id, "model_card")}
        assert logged == {f"model_card/card-v{version.version}.md"}
        return version.version

    ref = register({"kiln.variant": "fp32", "test_accuracy": "0.9500"}, "ref")
    steps = [("prune", "pruned", {"ratio": 0.5}, "600"), ("quantize", "int8", {}, "300")]
    parent = ref
    for kind, name, params, size in steps:
        parent = register(
            {
                "kiln.variant": kind,
                "kiln.variant_name": name,
                "kiln.parent_version": parent,
                "kiln.params": json.dumps(params),
                "size_bytes": size,
                "test_accuracy": "0.9400",
            },
            name,
        )
    card = model_card(uri, f"models:/card/{parent}")
    ref_size = sum(p.stat().st_size for p in (tmp_path / "ref").iterdir() if p.name != "MLmodel")
    assert f"- Parent: `models:/card/{int(parent) - 1}` (prune)" in card
    assert f"- Reference: `models:/card/{ref}` (fp32)" in card
    assert "  1. prune 'pruned' (ratio=0.5) -> v2" in card and "  2. quantize 'int8' -> v3" in card
    assert (
        f"- Size: 0.3 KB against {ref_size / 1024:.1f} KB ({ref_size / 300:.2f}x smaller)" in card
    )
    assert "- Test accuracy: 0.9400 against 0.9500 (-1.00 points)" in card
    # the data the weights were trained on, from the reference's run: rows and balance per split
    assert "- Rows per split: train 800, val 200, test 100 (total 1,100)" in card
    assert "| class | train | val | test |" in card
    assert "| a | 600 (75.0%) | 150 (75.0%) | 75 (75.0%) |" in card
    assert "| b | 200 (25.0%) | 50 (25.0%) | 25 (25.0%) |" in card
    assert "- Preprocessing: tabular: 0 feature(s) (); missing values -> the train mean" in card
    assert "with mean [0, 0, 0] and std [1, 1, 1] fitted on the train split" in card
    with pytest.raises(ModelError):
        model_card(uri, "models:/card/99")


def test_a_card_never_shows_the_tracking_servers_password():
    from kiln.models.card import public_uri

    assert public_uri("https://user:secret@mlflow.example:5000/") == "https://mlflow.example:5000/"
    assert public_uri("sqlite:////tmp/x/mlflow.db") == "sqlite:////tmp/x/mlflow.db"


def test_a_card_without_a_data_profile_gives_the_configured_fractions():
    assert split_lines(None, {"val": 0.2, "test": 0.2}) == ["- Split: fractions val 0.2, test 0.2"]
    assert split_lines(None, {}) == ["- Split: not recorded"]
    many = {
        "rows": {"total": 120, "train": 60, "val": 30, "test": 30},
        "labels": list(range(60)),
        "class_counts": {
            "train": [1] * 60,
            "val": [0] * 30 + [1] * 30,
            "test": [1] * 30 + [0] * 30,
        },
    }
    lines = split_lines(many, {})
    assert lines[0] == "- Rows per split: train 60, val 30, test 30 (total 120)"
    assert "the 50 largest classes of 60" in lines[1]
    assert len([line for line in lines if line.startswith("| ") and "%" in line]) == 50
