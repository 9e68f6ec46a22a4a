"""From ``data.*`` config to a streamed, split, preprocessed dataset.

``prepare_data`` makes two streaming passes over the source in Ray Data tasks (``scan``: labels,
keys, hash; ``fit``: split counts, train statistics, samples) and returns a ``PreparedData``: the
small plan that rebuilds any split as a Ray Data dataset anywhere (driver, Train worker, Tune
trial), the fitted preprocessing, the dataset hash, the profile, and bounded deterministic samples
of each split. No process holds the whole dataset: the driver keeps at most ``data.sample_rows``
rows of each split (the whole split when it is smaller, as for the built-in sources).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kiln.data.builtin import BUILTIN_SOURCES
from kiln.data.config import DataConfig
from kiln.data.decode import check_image_column, numeric_feature_columns
from kiln.data.fit import (
    FitResult,
    FitSpec,
    class_indices,
    fit,
    moments_to_fractions,
    raw_inputs,
)
from kiln.data.preprocess import Preprocessing
from kiln.data.profile import DataProfile, build_profile, feature_stats, image_stats
from kiln.data.rows import RowLayout, check_label_type, key_rows
from kiln.data.scan import ScanResult, per_input_tasks, scan
from kiln.data.source import Fragment, fragments, read_fragment
from kiln.data.split import SPLITS, SplitCuts, class_cuts
from kiln.errors import DataError

SAMPLE_BYTES = 64 << 20  # per split, whatever data.sample_rows asks for
LEAK_SAMPLE_ROWS = 1_000_000


@dataclass(frozen=True)
class DataPlan:
    """Everything a task needs to rebuild a split: fragments, columns, classes, cuts, image layout
    and preprocessing. Small and picklable: this, not the rows, is what travels to workers."""

    fragments: tuple[Fragment, ...]
    layout: RowLayout
    labels: tuple[Any, ...]
    cuts: SplitCuts
    channels: int | None
    image_size: tuple[int, int] | None
    preprocessing: Preprocessing
    split_rows: tuple[int, int, int]

    def fit_spec(self) -> FitSpec:
        return FitSpec(
            self.layout, self.labels, self.cuts, self.channels, self.image_size, (0, 0, 0), 0
        )


def model_rows(batch: dict[str, np.ndarray], plan: DataPlan, split: int) -> dict[str, np.ndarray]:
    """The model-ready rows of one fragment's ``split`` (a Ray Data task): ``x`` float32 and ``y``
    class indices."""
    xs, ys = [], []
    spec = plan.fit_spec()
    for i in batch["i"]:
        frag = plan.fragments[int(i)]
        rows = key_rows(read_fragment(frag, plan.layout.columns), plan.layout, frag.offset)
        classes = class_indices(plan.labels, rows.labels)
        keep = plan.cuts.assign(classes, rows.split_key) == split
        if plan.layout.kind == "image":
            picked = [cell for cell, k in zip(rows.x, keep, strict=True) if k]
            raw = raw_inputs(picked, spec, frag.offset) if picked else None
        else:
            raw = rows.x[keep]
        if raw is not None and len(raw):
            xs.append(plan.preprocessing.apply(raw))
            ys.append(classes[keep])
    if not xs:
        shape = [0, *plan.preprocessing.input_shape]
        return {"x": np.zeros(shape, np.float32), "y": np.zeros(0, np.int64)}
    return {"x": np.concatenate(xs), "y": np.concatenate(ys)}


def split_dataset(plan: DataPlan, name: str) -> Any:
    """Split ``name`` ('train', 'val', 'test') as a lazy Ray Data dataset of model-ready rows
    (``x`` float32, ``y`` int64), read, decoded and preprocessed in Ray Data tasks."""
    split = SPLITS.index(name)
    return per_input_tasks(len(plan.fragments), partial(model_rows, plan=plan, split=split))


@dataclass
class PreparedData:
    """A prepared dataset: the plan of its splits, preprocessing, labels, sizes, hash, profile and
    bounded samples (raw inputs and class indices of at most ``data.sample_rows`` rows a split,
    chosen by a seeded key: the whole split when it is smaller)."""

    plan: DataPlan
    labels: list[Any]
    preprocessing: Preprocessing
    dataset_hash: str
    class_counts: np.ndarray  # [3, num_classes]: train, val, test
    samples: dict[str, tuple[np.ndarray, np.ndarray]]
    profile: DataProfile | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the data section (``portable``)
    _ready: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> list[int]:
        return self.preprocessing.input_shape

    def sample(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(x model-ready float32, y) of the split's sample: the whole split when it is smaller
        than ``data.sample_rows``."""
        if split not in self._ready:
            x, _ = self.samples[split]
            self._ready[split] = (
                self.preprocessing.apply(x)
                if len(x)
                else np.zeros([0, *self.input_shape], np.float32)
            )
        return self._ready[split], self.samples[split][1]

    def sample_is_whole(self, split: str) -> bool:
        """Whether ``sample(split)`` holds every row of the split."""
        return len(self.samples[split][1]) == self.sizes()[split]

    # The samples under the names the small-data code used; bounded, see ``sample``.
    @property
    def x_train(self) -> np.ndarray:
        return self.sample("train")[0]

    @property
    def y_train(self) -> np.ndarray:
        return self.sample("train")[1]

    @property
    def x_val(self) -> np.ndarray:
        return self.sample("val")[0]

    @property
    def y_val(self) -> np.ndarray:
        return self.sample("val")[1]

    @property
    def x_test(self) -> np.ndarray:
        return self.sample("test")[0]

    @property
    def y_test(self) -> np.ndarray:
        return self.sample("test")[1]

    def class_weights(self) -> np.ndarray:
        """Inverse class frequency of the train split, normalized to mean 1 (absent classes get
        0)."""
        return class_weights(self.class_counts[0])

    def sizes(self) -> dict[str, int]:
        return {name: int(self.class_counts[i].sum()) for i, name in enumerate(SPLITS)}

    def dataset(self, split: str) -> Any:
        """The split as a lazy Ray Data dataset of model-ready rows (see ``split_dataset``)."""
        return split_dataset(self.plan, split)


def class_weights(train_counts: np.ndarray) -> np.ndarray:
    """Inverse class frequency, normalized to mean 1 (absent classes get 0)."""
    counts = np.asarray(train_counts, np.float64)
    n = len(counts)
    weights = np.where(counts > 0, counts.sum() / (n * np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)


def layout_of(cfg: DataConfig, schema: pa.Schema) -> RowLayout:
    """Which columns to read and how, checked against the schema. Raises DataError naming the
    key."""
    names = schema.names
    if cfg.label not in names:
        raise DataError(f"data.label: column '{cfg.label}' not found (columns: {', '.join(names)})")
    check_label_type(schema.field(cfg.label).type)
    base_dir = None
    if cfg.source not in BUILTIN_SOURCES and "://" not in cfg.source:
        base = Path(cfg.source).expanduser().resolve()
        base_dir = str(base if base.is_dir() else base.parent)
    if cfg.image:
        check_image_column(schema, cfg.image)
        return RowLayout("image", cfg.label, cfg.image, (), base_dir, cfg.split.seed)
    empty = schema.empty_table()
    features = cfg.features or numeric_feature_columns(empty, exclude=[cfg.label])
    for name in features:
        if name not in names:
            raise DataError(
                f"data.features: column '{name}' not found (columns: {', '.join(names)})"
            )
        typ = schema.field(name).type
        if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)):
            raise DataError(f"data.features: column '{name}' holds {typ}, not numbers")
    return RowLayout("tabular", cfg.label, None, tuple(features), base_dir, cfg.split.seed)


def content_hash(cfg: DataConfig, layout: RowLayout, found: ScanResult) -> str:
    """Order-independent content hash: the sums (mod 2**64) of two 64-bit digests of every row
    (input and label), with the columns, classes, image layout and split parameters."""
    h = hashlib.sha256()
    meta = {
        "kind": layout.kind,
        "features": list(layout.features),
        "labels": found.labels,
        "rows": found.rows,
        "image": [found.channels, list(found.image_size)] if found.image_size else None,
        "image_size": list(cfg.image_size) if cfg.image_size else None,
        "split": cfg.split.model_dump(),
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    h.update(found.lanes[0].to_bytes(8, "little") + found.lanes[1].to_bytes(8, "little"))
    return h.hexdigest()[:16]


def _fit_preprocessing(layout: RowLayout, spec: FitSpec, fitted: FitResult) -> Preprocessing:
    stats = fitted.stats
    n_train = int(fitted.class_counts[0].sum())
    if layout.kind == "image":
        assert spec.channels is not None and spec.image_size is not None
        pixels = max(int(stats.get("pixels", 0)), 1)
        mean, std = [], []
        for c in range(spec.channels):
            m = Fraction(int(stats["pixel_sum"][c]), 255 * pixels)
            var = Fraction(int(stats["pixel_sq"][c]), 255 * 255 * pixels) - m * m
            s = math.sqrt(max(float(var), 0.0))
            mean.append(float(m))
            std.append(s if s >= 1e-6 else 1.0)
        return Preprocessing(
            kind="image",
            mean=mean,
            std=std,
            channels=spec.channels,
            image_size=[int(spec.image_size[0]), int(spec.image_size[1])],
        )
    sums = moments_to_fractions(stats["moments"])
    mean, std = [], []
    for f, (s1, s2) in enumerate(sums):
        present = n_train - int(stats["missing"][f])
        if present <= 0:
            mean.append(0.0)
            std.append(1.0)
            continue
        m = s1 / present
        s = math.sqrt(max(float(s2 / present - m * m), 0.0))
        mean.append(float(m))
        std.append(s if s >= 1e-12 else 1.0)
    return Preprocessing(kind="tabular", mean=mean, std=std, feature_names=list(layout.features))


def _leakage(fitted: FitResult, fraction: float) -> dict[str, Any]:
    by_split = [fitted.leak_digests[fitted.leak_splits == s] for s in range(3)]
    scale = 1.0 / fraction if fraction > 0 else 0.0

    def shared(a: int, b: int) -> int:
        return int(round(np.isin(by_split[b], by_split[a]).sum() * scale))

    train = by_split[0]
    return {
        "train_val": shared(0, 1),
        "train_test": shared(0, 2),
        "val_test": shared(1, 2),
        "duplicates_within_train": int(round((len(train) - len(np.unique(train))) * scale)),
    }


def _profile(
    cfg: DataConfig,
    layout: RowLayout,
    digest: str,
    found: ScanResult,
    fitted: FitResult,
    leak_fraction: float,
) -> DataProfile:
    stats = fitted.stats
    x_train = fitted.samples["train"][0]
    n_train = int(fitted.class_counts[0].sum())
    features: list[dict[str, Any]] = []
    images: dict[str, Any] = {}
    if layout.kind == "tabular":
        sums = moments_to_fractions(stats["moments"])
        for f, name in enumerate(layout.features):
            entry: dict[str, Any] = (
                feature_stats(name, x_train[:, f]) if len(x_train) else {"name": name}
            )
            present = n_train - int(stats["missing"][f])
            entry["count"], entry["missing"] = n_train, int(stats["missing"][f])
            if present > 0:
                s1, s2 = sums[f]
                m = s1 / present
                entry["mean"] = float(m)
                entry["std"] = math.sqrt(max(float(s2 / present - m * m), 0.0))
                entry["min"], entry["max"] = float(stats["min"][f]), float(stats["max"][f])
            features.append(entry)
    elif len(x_train):
        images = image_stats(x_train)
        pixels = max(int(stats.get("pixels", 0)), 1)
        mean = [Fraction(int(v), 255 * pixels) for v in stats["pixel_sum"]]
        images["count"] = n_train
        images["channel_mean"] = [float(m) for m in mean]
        images["channel_std"] = [
            math.sqrt(max(float(Fraction(int(sq), 255 * 255 * pixels) - m * m), 0.0))
            for sq, m in zip(stats["pixel_sq"], mean, strict=True)
        ]
        edges = np.linspace(0, 256, 33).tolist()
        images["pixel_histogram"] = {"edges": edges, "counts": stats["pixel_hist"].tolist()}
    sampling = {
        "quantile_rows": int(len(x_train)),
        "leakage_fraction": leak_fraction,
        "exact": "rows, class counts, mean, std, min, max, missing, pixel histogram",
    }
    return build_profile(
        source=cfg.source,
        kind=layout.kind,
        dataset_hash=digest,
        labels=found.labels,
        class_counts=fitted.class_counts,
        features=features,
        images=images,
        leakage=_leakage(fitted, leak_fraction),
        sampling=sampling,
    )


def _sample_rows(cfg: DataConfig, layout: RowLayout, found: ScanResult) -> int:
    if layout.kind == "image":
        assert found.channels is not None and found.image_size is not None
        row_bytes = found.channels * found.image_size[0] * found.image_size[1] * 5
    else:
        row_bytes = 8 * max(len(layout.features), 1)
    return max(1, min(cfg.sample_rows, SAMPLE_BYTES // row_bytes))


def check_source(cfg: DataConfig) -> None:
    """What can be checked of ``data`` without Ray (footers and schema only): the source exists,
    holds Parquet, and has the configured columns. Raises DataError naming the key. Commands call
    it before they start or join a Ray instance, so a wrong path fails in a second."""
    layout_of(cfg, fragments(cfg.source)[1])


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Read, key, split (stratified, seeded), fit preprocessing on train only, hash and profile
    ``cfg.source``, streaming, in Ray Data tasks (Ray is started locally when not connected).

    Raises DataError naming the config key at fault."""
    from kiln.ray_connection import ensure_ray

    frags, schema = fragments(cfg.source)
    layout = layout_of(cfg, schema)
    ensure_ray()
    found = scan(frags, layout)
    if cfg.image and cfg.image_size:
        found.image_size = (int(cfg.image_size[0]), int(cfg.image_size[1]))
    cuts = class_cuts(found.counts, found.keys, cfg.split.val, cfg.split.test)
    per_split = _sample_rows(cfg, layout, found)
    leak_fraction = min(1.0, LEAK_SAMPLE_ROWS / max(found.rows, 1))
    spec = FitSpec(
        layout=layout,
        labels=tuple(found.labels),
        cuts=cuts,
        channels=found.channels,
        image_size=found.image_size,
        sample_rows=(per_split, per_split, per_split),
        leak_cut=min(int(leak_fraction * (1 << 64)), (1 << 64) - 1),
    )
    fitted = fit(list(frags), spec)
    if int(fitted.class_counts[0].sum()) == 0:
        raise DataError("data.split: no rows left for training")
    prep = _fit_preprocessing(layout, spec, fitted)
    digest = content_hash(cfg, layout, found)
    plan = DataPlan(
        fragments=tuple(frags),
        layout=layout,
        labels=tuple(found.labels),
        cuts=cuts,
        channels=found.channels,
        image_size=found.image_size,
        preprocessing=prep,
        split_rows=tuple(int(fitted.class_counts[i].sum()) for i in range(3)),  # type: ignore[arg-type]
    )
    return PreparedData(
        plan=plan,
        labels=list(found.labels),
        preprocessing=prep,
        dataset_hash=digest,
        class_counts=fitted.class_counts,
        samples=fitted.samples,
        profile=_profile(cfg, layout, digest, found, fitted, leak_fraction),
        config=cfg.portable(),
    )


CACHE_SHARE = 0.25  # 'auto' caches splits that take under this share of the object store
# ...and, in a run that reads them once, only up to this size: a small split costs the store
# little, and materializing it before the workers start runs its reading and decoding while CPUs
# are free (streamed, its Ray Data tasks share the cores with the training workers); a large one
# would be a copy nobody reads twice, whose pages every reading worker maps (1.3 GB of a 16x
# table's worker RSS: BENCHMARKS, data scale).
ONE_PASS_CACHE_BYTES = 64 << 20


def split_bytes(data: PreparedData, name: str) -> int:
    """Bytes of the split's model-ready rows (float32 inputs and int64 labels)."""
    return data.sizes()[name] * (4 * math.prod(data.input_shape) + 8)


def open_splits(
    data: PreparedData, names: tuple[str, ...], cache: str = "auto", passes: int = 2
) -> dict[str, Any]:
    """The splits ``names`` as Ray Data datasets. Cached (materialized in the object store, once)
    under ``cache='always'``, or ``'auto'`` when together they take under a quarter of the object
    store and, if the run reads them only once (``passes``: a one-epoch run), at most
    ONE_PASS_CACHE_BYTES; otherwise lazy: every epoch reads, decodes and preprocesses again,
    streaming."""
    import ray

    opened = {name: data.dataset(name) for name in names}
    if cache == "never":
        return opened
    if cache == "auto":
        size = sum(split_bytes(data, n) for n in names)
        if passes <= 1 and size > ONE_PASS_CACHE_BYTES:
            return opened
        resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
        capacity = float(resources.get("object_store_memory", 0.0))
        if size > CACHE_SHARE * capacity:
            return opened
    return {name: ds.materialize() for name, ds in opened.items()}
