"""kiln predict: batch inference with Ray Data over a Parquet file, on the module's Ray instance."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import served_models
from conftest import last_json, run_kiln
from served_models import VARIANTS

pytestmark = pytest.mark.module_seconds(50)

# The registered variants, a module fixture of served_models (pytest finds it by this name here).
registry = served_models.registry


def input_table(reg, kind: str) -> pa.Table:
    """A user's input file: the model's input columns, a label and an id column that must pass
    through."""
    if kind == "image":
        from kiln.data.builtin import load_builtin

        table = load_builtin("digits").slice(0, 300)
    else:
        table = pq.read_table(reg.iris)
    return table.append_column("row_id", pa.array(np.arange(table.num_rows) * 7))


def check_predictions(table: pa.Table, output, uri: str, kind: str, tracking_uri: str) -> None:
    """The output has one row per input row, in order, with what the model predicts in-process."""
    from kiln.data.decode import image_column, tabular_matrix
    from kiln.models.predictor import load_predictor

    out = pq.read_table(output)
    assert out.num_rows == table.num_rows
    assert (
        out.column("row_id").to_pylist() == table.column("row_id").to_pylist()
    )  # same rows, same order
    predictor = load_predictor(uri, tracking_uri)
    if kind == "image":
        assert "image" not in out.column_names
        inputs = image_column(table, "image")
    else:
        inputs = tabular_matrix(table, predictor.spec.preprocessing.feature_names)
    assert out.column("prediction").to_pylist() == predictor.predict(inputs)
    probs = np.asarray(out.column("probabilities").to_pylist(), np.float32)
    np.testing.assert_allclose(probs, predictor.predict_proba(inputs), atol=1e-5)
    np.testing.assert_allclose(out.column("probability").to_numpy(), probs.max(axis=1), atol=1e-6)


def test_kiln_predict_writes_one_prediction_per_input_row(ray_cluster, registry, tmp_path):
    """The command as a user runs it: progress shown, one output row per input row."""
    uri = registry.uris["fp32-cnn"]
    table = input_table(registry, "image")
    source, output = tmp_path / "in.parquet", tmp_path / "out" / "predictions.parquet"
    pq.write_table(table, source, row_group_size=100)
    proc = run_kiln(
        "predict",
        uri,
        str(source),
        str(output),
        "--address",
        ray_cluster,
        "--batch-size",
        "64",
        "--actors",
        "2",
        "--json",
        env={"MLFLOW_TRACKING_URI": registry.tracking_uri},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert last_json(proc.stdout)["rows"] == table.num_rows
    assert (
        f"predicted {table.num_rows}/{table.num_rows} rows" in proc.stderr
    )  # progress (stderr under --json)
    check_predictions(table, output, uri, "image", registry.tracking_uri)
    assert list(tmp_path.joinpath("out").iterdir()) == [output]  # no partial file left beside it


@pytest.mark.parametrize("variant_id", list(VARIANTS))
def test_batch_inference_matches_in_process_for_each_variant(
    ray_cluster, registry, tmp_path, variant_id
):
    """The library call behind `kiln predict`, for every served variant kind (its artifact
    format)."""
    from kiln.batch_inference import predict_parquet

    variant, uri = VARIANTS[variant_id], registry.uris[variant_id]
    table = input_table(registry, variant.kind)
    source, output = tmp_path / "in.parquet", tmp_path / "predictions.parquet"
    pq.write_table(table, source, row_group_size=50)
    seen = []
    result = predict_parquet(
        uri,
        source,
        output,
        tracking_uri=registry.tracking_uri,
        batch_size=32,
        actors=1,
        progress=lambda rows, total: seen.append((rows, total)),
    )
    assert result.rows == table.num_rows
    assert seen[-1] == (table.num_rows, table.num_rows) and len(seen) > 1  # progress while it ran
    check_predictions(table, output, uri, variant.kind, registry.tracking_uri)


def test_predict_user_mistakes(ray_cluster, registry, tmp_path):
    from kiln.batch_inference import predict_parquet
    from kiln.errors import DataError

    missing = run_kiln(
        "predict",
        registry.uris["fp32-cnn"],
        str(tmp_path / "nope.parquet"),
        str(tmp_path / "out.parquet"),
        "--address",
        ray_cluster,
        env={"MLFLOW_TRACKING_URI": registry.tracking_uri},
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: input file not found: {tmp_path / 'nope.parquet'}"
    ]

    digits = tmp_path / "digits.parquet"
    pq.write_table(input_table(registry, "image"), digits)
    with pytest.raises(
        DataError,
        match="lacks the model's feature columns: sepal_length, sepal_width, "
        "petal_length, petal_width",
    ):
        predict_parquet(
            registry.uris["fp32-mlp"],
            digits,
            tmp_path / "out.parquet",
            tracking_uri=registry.tracking_uri,
        )
    assert not (tmp_path / "out.parquet").exists()
