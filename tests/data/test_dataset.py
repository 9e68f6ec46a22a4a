"""Data pipeline: Parquet layouts, decoding, preprocessing fitted on train only, stratified splits,
hashing."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.data.config import DataConfig, SplitConfig
from kiln.data.dataset import prepare_data
from kiln.data.split import stratified_split
from kiln.errors import DataError
from synthetic import hf_image_parquet, tabular_parquet


def test_split_is_stratified_disjoint_and_deterministic():
    labels = np.repeat(np.arange(5), [100, 50, 20, 10, 3])
    a = stratified_split(labels, 0.2, 0.1, seed=3)
    b = stratified_split(labels.copy(), 0.2, 0.1, seed=3)
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
    all_idx = np.concatenate([a.train, a.val, a.test])
    assert sorted(all_idx.tolist()) == list(range(len(labels)))  # a partition
    assert np.bincount(labels[a.val], minlength=5).tolist() == [20, 10, 4, 2, 1]
    assert np.bincount(labels[a.test], minlength=5).tolist() == [10, 5, 2, 1, 0]
    c = stratified_split(labels, 0.2, 0.1, seed=4)
    assert not np.array_equal(a.val, c.val)


def test_split_known_values_are_platform_independent():
    # PCG64 streams are specified bit for bit: these indices must never change between machines.
    labels = np.array([0, 1] * 10)
    s = stratified_split(labels, 0.2, 0.2, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (12, 4, 4)
    assert s.test.tolist() == stratified_split(labels, 0.2, 0.2, seed=0).test.tolist()


def test_tabular_parquet_with_string_labels(tmp_path):
    path = tabular_parquet(tmp_path / "t.parquet")
    data = prepare_data(DataConfig(source=str(path), label="species"))
    assert data.labels == ["cat", "dog", "emu"]
    assert data.preprocessing.kind == "tabular"
    assert data.preprocessing.feature_names == ["big", "tiny", "count", "noise"]
    # standardized with train statistics: train columns have mean 0 and std 1, nulls imputed
    assert np.allclose(data.x_train.mean(axis=0), 0, atol=0.05)
    assert np.allclose(data.x_train.std(axis=0), 1, atol=0.05)
    assert not np.isnan(data.x_train).any()
    assert sum(data.sizes().values()) == 600


def test_hf_image_parquet_decodes_png_and_jpeg(tmp_path):
    path = hf_image_parquet(tmp_path / "i.parquet", rows=60)
    data = prepare_data(DataConfig(source=str(path), label="label", image="image"))
    assert data.input_shape == [3, 16, 16]
    assert data.labels == ["hbar", "square", "vbar"]
    assert data.x_train.dtype == np.float32
    assert len(data.preprocessing.mean) == 3


def test_images_of_other_sizes_are_resized_and_binary_column_works(tmp_path):
    from synthetic import _encode, shape_images

    images, labels = shape_images(40, size=16)
    small, _ = shape_images(10, size=12)
    cells = [_encode(i, "PNG") for i in images + small]
    pq.write_table(
        pa.table({"img": pa.array(cells, pa.binary()), "y": list(labels) + [0] * 10}),
        tmp_path / "b.parquet",
    )
    data = prepare_data(DataConfig(source=str(tmp_path / "b.parquet"), label="y", image="img"))
    assert data.input_shape == [3, 16, 16]
    assert data.labels == [0, 1, 2]
    fixed = prepare_data(
        DataConfig(source=str(tmp_path / "b.parquet"), label="y", image="img", image_size=(8, 8))
    )
    assert fixed.input_shape == [3, 8, 8]


def test_parquet_folder_reads_as_one_dataset(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    table = pq.read_table(tabular_parquet(tmp_path / "t.parquet"))
    pq.write_table(table.slice(0, 300), folder / "part-0.parquet")
    pq.write_table(table.slice(300), folder / "part-1.parquet")
    data = prepare_data(DataConfig(source=str(folder), label="species"))
    assert sum(data.sizes().values()) == 600


def test_dataset_hash_tracks_content_and_split(tmp_path):
    path = tabular_parquet(tmp_path / "t.parquet")
    base = prepare_data(DataConfig(source=str(path), label="species")).dataset_hash
    assert prepare_data(DataConfig(source=str(path), label="species")).dataset_hash == base
    other_seed = DataConfig(source=str(path), label="species", split=SplitConfig(seed=1))
    assert prepare_data(other_seed).dataset_hash != base
    changed = tabular_parquet(tmp_path / "t2.parquet", seed=1)
    assert prepare_data(DataConfig(source=str(changed), label="species")).dataset_hash != base


def test_class_weights_are_inverse_frequency():
    from kiln.data.dataset import PreparedData

    y = np.array([0] * 90 + [1] * 10)
    d = PreparedData(
        x_train=np.zeros((100, 1), np.float32),
        y_train=y,
        x_val=None,
        y_val=None,
        x_test=None,
        y_test=None,
        labels=[0, 1],
        preprocessing=None,
        dataset_hash="",
        split=None,
    )
    w = d.class_weights()
    assert w[1] / w[0] == pytest.approx(9.0)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (
            dict(source="/nonexistent/data.parquet"),
            "data.source: file not found: /nonexistent/data.parquet",
        ),
        (dict(label="nope"), "data.label: column 'nope' not found"),
        (dict(image="pixels"), "data.image: column 'pixels' not found"),
        (dict(source="imagenet"), "file not found: imagenet"),
    ],
)
def test_bad_data_config_is_a_clear_error(tmp_path, cfg, message):
    base = dict(source="digits", image="image", label="label")
    base.update(cfg)
    with pytest.raises(DataError) as err:
        prepare_data(DataConfig(**base))
    assert message in str(err.value)


def test_undecodable_image_names_the_row(tmp_path):
    from synthetic import _encode, shape_images

    images, labels = shape_images(5)
    cells = [_encode(i, "PNG") for i in images]
    cells[3] = b"definitely not an image"
    pq.write_table(
        pa.table({"image": pa.array(cells, pa.binary()), "label": labels}), tmp_path / "x.parquet"
    )
    with pytest.raises(DataError, match=r"data.image: row 3 does not decode as an image"):
        prepare_data(DataConfig(source=str(tmp_path / "x.parquet"), image="image"))


def test_string_feature_columns_are_rejected_clearly(tmp_path):
    pq.write_table(
        pa.table({"a": [1.0, 2.0, 3.0, 4.0], "city": ["x", "y", "x", "y"], "label": [0, 1, 0, 1]}),
        tmp_path / "s.parquet",
    )
    with pytest.raises(DataError, match="non-numeric columns city"):
        prepare_data(DataConfig(source=str(tmp_path / "s.parquet")))
    data = prepare_data(
        DataConfig(
            source=str(tmp_path / "s.parquet"), features=["a"], split=SplitConfig(val=0.0, test=0.0)
        )
    )
    assert data.input_shape == [1]
