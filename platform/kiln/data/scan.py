"""The first streaming pass: every fragment is read and keyed in a Ray Data task, which returns a
small partial result (label counts, the keys of small classes, hash sums, image sizes); the driver
merges the partials as they arrive, so its memory does not grow with the data.

``run_pass`` is the pattern both passes use: a map over fragment indices whose tasks return one
pickled partial each, consumed by the driver one at a time.
"""

from __future__ import annotations

import io
import math
import pickle
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from kiln.data.rows import LANE_SALT, RowLayout, key_rows, salted
from kiln.data.source import Fragment, read_fragment
from kiln.data.split import EXACT_CLASS_ROWS
from kiln.errors import DataError

MAX_CLASSES = 10_000
MAX_IMAGE_SIZES = 10_000  # distinct (height, width) pairs counted for the most common size
MAX_IMAGE_PIXELS = 4096 * 4096


def per_input_tasks(count: int, fn: Callable[[dict[str, np.ndarray]], Any]) -> Any:
    """A lazy Ray Data dataset of ``fn`` over the ints 0..count-1 (column ``i``), one Ray Data
    task per int (batches of one; up to 1,000 input blocks).

    The inputs are made in this process (``ray.data.range`` reads them in a task of a whole CPU)
    and the tasks reserve no CPU, at most one per CPU of the cluster (and per input) running at
    once: with Ray Data's default of a whole CPU a task, a split streamed on an instance whose CPUs
    the training workers (and serving replicas) held waited forever. Unreserved, the tasks share
    the cores with the training they feed, and the cap keeps them from outnumbering the cores."""
    import ray
    import ray.data

    cpus = float(ray.cluster_resources().get("CPU", 1.0))  # type: ignore[no-untyped-call]
    inputs = ray.data.from_items(
        [{"i": i} for i in range(count)], override_num_blocks=max(1, min(count, 1000))
    )
    return inputs.map_batches(
        fn,
        batch_size=1,
        batch_format="numpy",
        num_cpus=0,
        # `compute`, not `concurrency=N`: the same task pool, without Ray Data's deprecation
        # warning (checked on Ray 2.60, where `concurrency` is deprecated since 2.51)
        compute=ray.data.TaskPoolStrategy(size=max(1, min(count, math.ceil(cpus)))),
    )


def _task(batch: dict[str, np.ndarray], work: Callable[[int], Any]) -> dict[str, np.ndarray]:
    blobs = [pickle.dumps(work(int(i)), protocol=5) for i in batch["i"]]
    return {"partial": np.array(blobs, dtype=object)}


def run_pass(count: int, work: Callable[[int], Any], what: str) -> Iterator[Any]:
    """``work(i)`` for i in range(count), each in a Ray Data task; yields results as they come
    (in no set order)."""
    mapped = per_input_tasks(count, partial(_task, work=work))
    for batch in mapped.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=4):
        for blob in batch["partial"]:
            yield pickle.loads(blob)


def _image_header(data: bytes) -> tuple[int, int, bool]:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(str(exc) or "not an image") from None
    colour = img.mode not in ("L", "1", "I", "I;16", "F")
    return int(img.height), int(img.width), colour


def scan_fragment(i: int, fragments: list[Fragment], layout: RowLayout) -> dict[str, Any]:
    """Pass 1 over fragment ``i``: label counts, small classes' keys, hash lanes, image sizes."""
    frag = fragments[i]
    out: dict[str, Any] = {"offset": frag.offset, "rows": frag.rows, "error": None}
    try:
        rows = key_rows(read_fragment(frag, layout.columns), layout, frag.offset)
        sizes: Counter[tuple[int, int]] = Counter()
        colour = False
        if layout.kind == "image":
            for j, data in enumerate(rows.x):
                try:
                    h, w, c = _image_header(data)
                except ValueError as exc:
                    raise DataError(
                        f"data.image: row {frag.offset + j} does not decode as an image ({exc})"
                    ) from None
                if h * w > MAX_IMAGE_PIXELS:
                    raise DataError(
                        f"data.image: row {frag.offset + j} is {h}x{w} pixels "
                        f"(limit {MAX_IMAGE_PIXELS})"
                    )
                sizes[(h, w)] += 1
                colour = colour or bool(c)
    except DataError as exc:
        out["error"] = str(exc)
        return out
    values, inverse, counts = np.unique(rows.labels, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    keys = {}
    for k, (value, n) in enumerate(zip(values.tolist(), counts.tolist(), strict=True)):
        if n <= EXACT_CLASS_ROWS:
            keys[value] = rows.split_key[inverse == k]
    lane2 = salted(rows.content_digest, LANE_SALT)
    out.update(
        labels=dict(zip(values.tolist(), counts.tolist(), strict=True)),
        keys=keys,
        lanes=(
            int(rows.content_digest.sum(dtype=np.uint64)),
            int(lane2.sum(dtype=np.uint64)),
        ),
        sizes=sizes,
        colour=colour,
        string_labels=rows.labels.dtype == object,
    )
    return out


@dataclass
class ScanResult:
    """What pass 1 found: sorted label values, rows per class, the keys of small classes, hash
    lanes, and for images the channel count and the most common size."""

    rows: int
    labels: list[Any]
    counts: list[int]
    keys: list[np.ndarray | None]
    lanes: tuple[int, int]
    channels: int | None = None
    image_size: tuple[int, int] | None = None
    size_counts: dict[tuple[int, int], int] = field(default_factory=dict)


def scan(fragments: list[Fragment], layout: RowLayout) -> ScanResult:
    """Run pass 1 and merge it. Raises DataError for the first bad row (by position), a single
    class or too many classes."""
    counts: Counter[Any] = Counter()
    keys: dict[Any, list[np.ndarray] | None] = {}
    lanes = [0, 0]
    sizes: Counter[tuple[int, int]] = Counter()
    colour = False
    errors: list[tuple[int, str]] = []
    kinds: set[bool] = set()
    work = partial(scan_fragment, fragments=fragments, layout=layout)
    for part in run_pass(len(fragments), work, "scan"):
        if part["error"]:
            errors.append((part["offset"], part["error"]))
            continue
        kinds.add(part["string_labels"])
        for value, n in part["labels"].items():
            counts[value] += n
            held = keys.setdefault(value, [])
            if held is not None and value in part["keys"] and counts[value] <= EXACT_CLASS_ROWS:
                held.append(part["keys"][value])
            else:
                keys[value] = None  # a large class: cut at the fractions
        if len(counts) > MAX_CLASSES:
            raise DataError(f"data.label: more than {MAX_CLASSES} classes")
        lanes = [
            (lanes[0] + part["lanes"][0]) % (1 << 64),
            (lanes[1] + part["lanes"][1]) % (1 << 64),
        ]
        sizes.update(part["sizes"])
        if len(sizes) > MAX_IMAGE_SIZES:
            sizes = Counter(dict(sizes.most_common(MAX_IMAGE_SIZES // 2)))
        colour = colour or part["colour"]
    if errors:
        raise DataError(min(errors)[1])
    if len(kinds) > 1:
        raise DataError("data.label: some files hold numbers and others strings as labels")
    labels = sorted(counts)
    if len(labels) < 2:
        raise DataError(f"data.label: only one class ({labels[0]!r}) in the data")
    result = ScanResult(
        rows=sum(counts.values()),
        labels=labels,
        counts=[counts[v] for v in labels],
        keys=[np.concatenate(keys[v]) if keys[v] is not None else None for v in labels],  # type: ignore[arg-type]
        lanes=(lanes[0], lanes[1]),
    )
    if layout.kind == "image":
        result.channels = 3 if colour else 1
        # the most common size; ties broken by the size itself, so the choice is order-free
        result.image_size = max(sizes.items(), key=lambda kv: (kv[1], kv[0]))[0]
        result.size_counts = dict(sizes)
    return result
