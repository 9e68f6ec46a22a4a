"""Data pipeline: Parquet layouts, decoding, preprocessing fitted on train only, stratified splits,
hashing."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.data.config import DataConfig, SplitConfig
from kiln.data.dataset import open_splits, prepare_data
from kiln.data.split import class_cuts
from kiln.errors import DataError
from kiln.waiting import wait_until
from synthetic import hf_image_parquet, tabular_parquet

# Data is read in Ray Data tasks: every test here runs on the session's Ray instance.
pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_split_cuts_give_exact_per_class_counts_and_a_partition():
    from kiln.data.split import TEST, TRAIN, VAL

    labels = np.repeat(np.arange(5), [100, 50, 20, 10, 3])
    keys = np.random.default_rng(0).integers(0, 2**63, len(labels), dtype=np.uint64)
    per_class = [keys[labels == c] for c in range(5)]
    cuts = class_cuts([len(k) for k in per_class], per_class, 0.2, 0.1)
    split = cuts.assign(labels, keys)
    assert set(split.tolist()) == {TRAIN, VAL, TEST}  # a partition: every row in one split
    assert np.bincount(labels[split == VAL], minlength=5).tolist() == [20, 10, 4, 2, 1]
    assert np.bincount(labels[split == TEST], minlength=5).tolist() == [10, 5, 2, 1, 0]
    # a large class (keys not collected) is cut at the fractions themselves
    big = class_cuts([10**6], [None], 0.2, 0.1)
    many = np.random.default_rng(1).integers(0, 2**64 - 1, 200_000, dtype=np.uint64)
    frac = np.bincount(big.assign(np.zeros(len(many), np.int64), many), minlength=3) / len(many)
    assert abs(frac[VAL] - 0.2) < 0.01 and abs(frac[TEST] - 0.1) < 0.01


def test_split_does_not_depend_on_files_and_the_seed_changes_it(tmp_path):
    """The same rows in one Parquet file or seven (other blocks, other order): the same split
    sizes, hash, statistics and samples; another seed gives another split."""
    table = pq.read_table(tabular_parquet(tmp_path / "t.parquet", rows=900))
    folder = tmp_path / "seven"
    folder.mkdir()
    order = np.random.default_rng(5).permutation(len(table))
    shuffled = table.take(order)
    for i, part in enumerate(np.array_split(np.arange(len(table)), 7)):
        pq.write_table(shuffled.take(part), folder / f"part-{i}.parquet", row_group_size=50)
    one = prepare_data(DataConfig(source=str(tmp_path / "t.parquet"), label="species"))
    seven = prepare_data(DataConfig(source=str(folder), label="species"))
    assert len(seven.plan.fragments) == 7 and len(one.plan.fragments) == 1
    assert one.sizes() == seven.sizes()
    assert one.class_counts.tolist() == seven.class_counts.tolist()
    assert one.dataset_hash == seven.dataset_hash
    assert one.preprocessing.to_dict() == seven.preprocessing.to_dict()  # to the last bit
    np.testing.assert_array_equal(one.x_val, seven.x_val)
    other = prepare_data(DataConfig(source=str(folder), label="species", split=SplitConfig(seed=9)))
    assert not np.array_equal(other.x_val, one.x_val)


def test_class_proportions_hold_on_an_imbalanced_table(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {"a": 3000, "b": 600, "c": 150, "d": 100}
    labels = np.concatenate([[k] * n for k, n in sizes.items()])
    table = pa.table({"f": rng.normal(size=len(labels)), "label": labels})
    pq.write_table(table, tmp_path / "imb.parquet", row_group_size=500)
    data = prepare_data(DataConfig(source=str(tmp_path / "imb.parquet")))
    whole = np.array(list(sizes.values())) / len(labels)
    for i, _ in enumerate(("train", "val", "test")):
        part = data.class_counts[i] / data.class_counts[i].sum()
        assert np.abs(part - whole).max() < 0.01


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


def test_auto_caches_a_one_pass_split_only_when_it_is_small(tmp_path, monkeypatch):
    from ray.data.dataset import MaterializedDataset

    from kiln.data import dataset

    data = prepare_data(
        DataConfig(source=str(tabular_parquet(tmp_path / "t.parquet")), label="species")
    )
    size = dataset.split_bytes(data, "train") + dataset.split_bytes(data, "val")
    small_once = open_splits(data, ("train", "val"), "auto", passes=1)  # a one-epoch run
    again = open_splits(data, ("train", "val"), "auto", passes=3)
    never = open_splits(data, ("train", "val"), "never", passes=3)
    monkeypatch.setattr(dataset, "ONE_PASS_CACHE_BYTES", size - 1)  # as if the split were large
    large_once = open_splits(data, ("train", "val"), "auto", passes=1)
    large_again = open_splits(data, ("train", "val"), "auto", passes=2)
    forced = open_splits(data, ("train", "val"), "always", passes=1)
    cached = [*small_once.values(), *again.values(), *large_again.values(), *forced.values()]
    assert all(isinstance(ds, MaterializedDataset) for ds in cached)
    assert not any(
        isinstance(ds, MaterializedDataset) for ds in [*never.values(), *large_once.values()]
    )
    assert large_once["train"].count() == again["train"].count() == data.sizes()["train"]


@pytest.mark.timeout(180)  # before the fix this waited forever for a CPU
def test_data_is_read_and_streamed_while_every_cpu_is_held(tmp_path):
    """A busy instance (serving replicas, training workers) may hold every CPU: Kiln's Ray Data
    tasks reserve none, so the data is still scanned, split and streamed (Ray Data's default, a
    whole CPU a task, waited forever)."""
    import ray

    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    holders = []

    def every_cpu_held() -> bool:
        # CPUs an earlier test's work still held when we looked are taken as they come free
        free = float(ray.available_resources().get("CPU", 0.0))  # type: ignore[no-untyped-call]
        if free > 0:
            holders.append(Holder.options(num_cpus=free).remote())  # type: ignore[attr-defined]
            ray.get(holders[-1].ready.remote(), timeout=60)
        return ray.available_resources().get("CPU", 0.0) == 0.0  # type: ignore[no-untyped-call]

    try:
        wait_until(every_cpu_held, timeout=60, what="every CPU held")
        data = prepare_data(
            DataConfig(source=str(tabular_parquet(tmp_path / "t.parquet")), label="species")
        )
        streamed = open_splits(data, ("train",), "never")["train"]
        rows = sum(len(b["y"]) for b in streamed.iter_batches(batch_size=None))
        assert rows == data.sizes()["train"] > 0
    finally:
        for holder in holders:
            ray.kill(holder)


def test_dataset_hash_tracks_content_and_split(tmp_path):
    path = tabular_parquet(tmp_path / "t.parquet")
    base = prepare_data(DataConfig(source=str(path), label="species")).dataset_hash
    assert prepare_data(DataConfig(source=str(path), label="species")).dataset_hash == base
    other_seed = DataConfig(source=str(path), label="species", split=SplitConfig(seed=1))
    assert prepare_data(other_seed).dataset_hash != base
    changed = tabular_parquet(tmp_path / "t2.parquet", seed=1)
    assert prepare_data(DataConfig(source=str(changed), label="species")).dataset_hash != base


def test_class_weights_are_inverse_frequency():
    from kiln.data.dataset import class_weights

    w = class_weights(np.array([90, 10]))
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
