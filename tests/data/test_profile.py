"""Data profiles: balance, statistics, leakage; the CLI writes HTML, PNG and JSON."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, last_json, run_kiln
from kiln.data.config import DataConfig
from kiln.data.dataset import prepare_data
from synthetic import tabular_parquet

pytestmark = pytest.mark.usefixtures("ray_cluster")  # data is read in Ray Data tasks


def test_profile_of_tabular_data_describes_raw_train_features(tmp_path):
    path = tabular_parquet(tmp_path / "t.parquet", rows=600)
    data = prepare_data(DataConfig(source=str(path), label="species"))
    prof = data.profile
    assert prof.rows == {
        "total": 600,
        "train": data.sizes()["train"],
        "val": data.sizes()["val"],
        "test": data.sizes()["test"],
    }
    big = next(f for f in prof.features if f["name"] == "big")
    assert big["missing"] > 0 and 500 < big["mean"] < 1500  # raw scale, before standardization
    assert (
        len(big["quantiles"]) == 101
        and sum(big["histogram"]["counts"]) == big["count"] - big["missing"]
    )
    assert sum(prof.class_counts["train"]) == prof.rows["train"]
    assert not prof.has_leak


def test_profile_reports_imbalance_and_image_statistics(tmp_path):
    data = prepare_data(DataConfig(source="digits", image="image"))
    assert data.profile.images["channels"] == 1 and data.profile.images["height"] == 8
    assert 1.0 <= data.profile.imbalance_ratio < 1.2
    table = pq.read_table(tabular_parquet(tmp_path / "t.parquet", rows=600))
    labels = table.column("species").to_pylist()
    keep = [i for i, label in enumerate(labels) if label != "emu" or i % 10 == 0]
    pq.write_table(table.take(keep), tmp_path / "imb.parquet")
    imbalanced = prepare_data(DataConfig(source=str(tmp_path / "imb.parquet"), label="species"))
    assert imbalanced.profile.imbalance_ratio > 5


def test_profile_cli_reports_leak_between_splits(tmp_path, ray_cluster):
    # The same inputs under other labels: a whole duplicated row (input and label) has the same
    # split key and always lands in the same split, but the same input with another label may not.
    table = pq.read_table(tabular_parquet(tmp_path / "t.parquet", rows=300))
    copies = table.slice(0, 150)
    relabelled = pa.array(
        [
            {"cat": "dog", "dog": "emu", "emu": "cat"}[v]
            for v in copies.column("species").to_pylist()
        ]
    )
    copies = copies.set_column(copies.schema.get_field_index("species"), "species", relabelled)
    pq.write_table(pa.concat_tables([table, copies]), tmp_path / "leaky.parquet")
    out = tmp_path / "profile"
    proc = run_kiln(
        "data",
        "profile",
        str(tmp_path / "leaky.parquet"),
        "--label",
        "species",
        "--out",
        str(out),
        "--json",
        "--address",
        ray_cluster,
    )
    assert proc.returncode == 0, proc.stderr
    result = last_json(proc.stdout)
    leak = result["leakage"]
    assert leak["train_val"] + leak["train_test"] + leak["val_test"] > 0
    assert "LEAK" in proc.stderr
    assert {"profile.html", "profile.json", "class_balance.png", "histograms.png"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "profile.json").read_text())["leakage"] == leak
    assert "Leakage: identical inputs" in (out / "profile.html").read_text()

    clean = run_kiln(
        "data",
        "profile",
        str(REPO / "configs/train/digits_cnn.yaml"),
        "--out",
        str(tmp_path / "d"),
        "--address",
        ray_cluster,
    )
    assert clean.returncode == 0 and "no identical inputs shared" in clean.stdout
    missing = run_kiln("data", "profile", str(tmp_path / "nope.parquet"))
    assert missing.returncode == 2 and missing.stderr.startswith(
        "error: data.source: file not found"
    )
