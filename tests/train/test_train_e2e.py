"""End-to-end training through the CLI, against a real local Ray instance and a real MLflow sqlite
store."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO, last_json, run_kiln
from kiln import tracking as trk
from kiln.models.predictor import load_predictor
from synthetic import hf_image_parquet, shape_images, tabular_parquet

DEFAULT = str(REPO / "configs/train/digits_cnn.yaml")
pytestmark = [pytest.mark.slow, pytest.mark.module_seconds(220)]


def train(address, run_dir, *overrides, config=DEFAULT, expect=0):
    proc = run_kiln(
        "train", config, "--address", address, "--json", f"experiment.run_dir={run_dir}", *overrides
    )
    assert proc.returncode == expect, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return last_json(proc.stdout) if expect == 0 else proc


def registered_versions(run_dir, name):
    uri = trk.default_tracking_uri(run_dir)
    try:
        return list(trk.iter_model_versions(uri, name))
    except Exception:
        return []


def test_digits_cnn_two_workers_tracked_registered_and_predicting(
    ray_cluster, run_dir, monkeypatch
):
    out = train(ray_cluster, run_dir, "train.epochs=8")
    assert out["metrics"]["test_accuracy"] >= 0.95
    assert out["metrics"]["test_f1_macro"] >= 0.95
    assert out["model_uri"] == "models:/digits-cnn/1"
    assert {"run_id", "tracking_uri", "dataset_hash", "checkpoint"} <= set(out)

    run = trk.get_run(out["tracking_uri"], out["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (
        params["train.workers"] == "2"
        and params["model.name"] == "cnn"
        and params["data.source"] == "digits"
    )
    tags = run.data.tags
    assert tags[trk.TAG_DATASET_HASH] == out["dataset_hash"]
    assert tags[trk.TAG_CODE_VERSION] and tags[trk.TAG_KILN_VERSION] == "0.1.0"
    history = trk.metric_history(out["tracking_uri"], out["run_id"], "val_f1_macro")
    assert sorted(m.step for m in history) == list(range(8))
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert len(trk.metric_history(out["tracking_uri"], out["run_id"], key)) == 8
    artifacts = {a.path for a in trk.client(out["tracking_uri"]).list_artifacts(out["run_id"])}
    assert {
        "model",
        "confusion_matrix.png",
        "classification_report.json",
        "config.yaml",
        "reference_profile.json",
    } <= artifacts
    model_files = {
        a.path for a in trk.client(out["tracking_uri"]).list_artifacts(out["run_id"], "model")
    }
    assert (
        "model/monitor_reference.json" in model_files
    )  # what serving monitors this version against

    # the registered version loads and predicts, from encoded images as a user has them
    from kiln.data.builtin import load_builtin

    predictor = load_predictor(out["model_uri"], tracking_uri=out["tracking_uri"])
    table = load_builtin("digits")
    images = [c["bytes"] for c in table.column("image").to_pylist()[:300]]
    truth = table.column("label").to_pylist()[:300]
    assert np.mean(np.array(predictor.predict(images)) == np.array(truth)) >= 0.95

    import mlflow.pyfunc

    # Through the environment, restored after the test: mlflow.set_tracking_uri would also write
    # MLFLOW_TRACKING_URI into this process's environment for good, and every later kiln
    # subprocess would track into this test's store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", out["tracking_uri"])
    mlflow_model = mlflow.pyfunc.load_model(out["model_uri"])
    assert mlflow_model.predict(images[:10]) == predictor.predict(images[:10])
    _same_data_as_prepared_here(out, predictor)


def _same_data_as_prepared_here(out, predictor):
    """The run's split sizes, dataset hash and fitted statistics are those the data layer computes
    in this process, with no worker at all: they depend on the data and the seed only."""
    from kiln.data.config import DataConfig
    from kiln.data.dataset import prepare_data

    data = prepare_data(DataConfig(source="digits", image="image"))
    assert out["split_sizes"] == data.sizes()
    assert out["dataset_hash"] == data.dataset_hash
    assert predictor.spec.preprocessing.to_dict() == data.preprocessing.to_dict()


def test_tabular_parquet_with_string_labels_trains_and_predicts(ray_cluster, run_dir, tmp_path):
    path = tabular_parquet(tmp_path / "animals.parquet", rows=900)
    config = tmp_path / "animals.yaml"
    config.write_text(f"""
experiment: {{name: animals}}
data: {{source: {path}, label: species}}
model: {{name: mlp, hidden: [32], dropout: 0.0}}
train: {{epochs: 15, lr: 0.01, workers: 1, class_weights: auto}}
""")
    out = train(ray_cluster, run_dir, config=str(config))
    assert out["metrics"]["test_accuracy"] >= 0.85
    predictor = load_predictor(out["model_uri"], tracking_uri=out["tracking_uri"])
    rows = pq.read_table(path).slice(0, 200)
    preds = predictor.predict(rows)  # records with raw (unscaled) columns, label column ignored
    assert set(preds) <= {"cat", "dog", "emu"}
    assert np.mean(np.array(preds) == np.array(rows.column("species").to_pylist())) >= 0.85
    assert predictor.predict([{"big": 2000.0, "tiny": 0.0, "count": 7, "noise": 0.0}]) == ["emu"]


def test_hf_image_parquet_trains_and_predicts(ray_cluster, run_dir, tmp_path):
    path = hf_image_parquet(tmp_path / "shapes.parquet", rows=450)
    out = train(
        ray_cluster,
        run_dir,
        "experiment.name=shapes",
        f"data.source={path}",
        "model.width=16",
        "train.workers=1",
        "train.cpus_per_worker=1",
        "train.epochs=10",
    )
    assert out["metrics"]["test_accuracy"] >= 0.9
    predictor = load_predictor(out["model_uri"], tracking_uri=out["tracking_uri"])
    images, labels = shape_images(60, seed=99)
    names = np.array(["hbar", "vbar", "square"])
    assert np.mean(np.array(predictor.predict(images)) == names[labels]) >= 0.85


def test_same_config_on_one_worker_gives_same_metrics(ray_cluster, run_dir):
    args = ("experiment.name=repeat", "train.workers=1", "train.epochs=3", "model.width=8")
    first = train(ray_cluster, run_dir, *args)
    second = train(ray_cluster, run_dir, *args)
    assert first["run_id"] != second["run_id"]
    assert first["metrics"] == second["metrics"]
    assert first["epochs"] == second["epochs"]
    assert first["dataset_hash"] == second["dataset_hash"]
    # ...and the same data as the two-worker run of the first test (same config's data section)
    _same_data_as_prepared_here(
        first, load_predictor(first["model_uri"], tracking_uri=first["tracking_uri"])
    )


def _bad(ray_cluster, run_dir, *overrides):
    proc = train(ray_cluster, run_dir, "experiment.name=bad", *overrides, expect=2)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert registered_versions(run_dir, "bad") == []
    return lines[-1]


def test_bad_inputs_fail_with_one_line_and_register_nothing(ray_cluster, run_dir, tmp_path):
    assert (
        _bad(ray_cluster, run_dir, "train.epoch=2")
        == "error: unknown config key 'train.epoch' (did you mean 'train.epochs'?)"
    )
    assert (
        _bad(ray_cluster, run_dir, "data.source=/no/such/file.parquet")
        == "error: data.source: file not found: /no/such/file.parquet"
    )
    assert _bad(ray_cluster, run_dir, "data.label=digit").startswith(
        "error: data.label: column 'digit' not found"
    )

    import pyarrow as pa

    cells = [{"bytes": b"\x89PNG broken", "path": None}] * 4
    broken = tmp_path / "broken.parquet"
    pq.write_table(
        pa.table(
            {
                "image": pa.array(
                    cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())])
                ),
                "label": [0, 1, 0, 1],
            }
        ),
        broken,
    )
    assert _bad(ray_cluster, run_dir, f"data.source={broken}").startswith(
        "error: data.image: row 0 does not decode as an image"
    )

    line = _bad(ray_cluster, run_dir, "train.workers=5", "train.cpus_per_worker=1")
    assert line.startswith(
        "error: train.workers=5 needs 5 x (1 CPU) but the cluster can place only 2"
    )

    assert _bad(
        ray_cluster,
        run_dir,
        "model.name=cnn",
        "data.image=null",
        "data.source=" + str(tabular_parquet(tmp_path / "t.parquet")),
        "data.label=species",
    ).startswith("error: config key 'model': model 'cnn' cannot take this data")
    # no run was even started for these input errors
    assert not list(
        trk.client(trk.default_tracking_uri(run_dir)).search_experiments(
            filter_string="name = 'bad'"
        )
    )
