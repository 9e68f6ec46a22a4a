"""Memory stays flat as data grows: train one epoch on tabular Parquet of 1x, 4x and 16x rows and
on image Parquet of 1x and 4x, with 2 Ray Train workers, and record the peak memory of the driver
and of each worker, the time of the streaming split + statistics pass, and the time to the first
batch.

Each size runs in its own driver subprocess with its own local Ray instance, so the process tree
under that driver is the whole job (raylet, Ray Data tasks, Train workers). psutil samples it every
0.2 s: RSS, and RSS less shared pages (pages of Ray's object store that a process has mapped count
as shared).

Full size (tabular 1x = 1M rows x 32 float32 features = 128 MB raw, 16x = 2 GB; images 1x =
20,000 32x32 RGB PNGs):  python bench/data_scale.py
Smaller, for a shared 2-core machine:                  python bench/data_scale.py --scale 0.05
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import print_machine  # noqa: E402

TABULAR_ROWS, FEATURES = 1_000_000, 32
IMAGE_ROWS, IMAGE_SIDE = 20_000, 32

DRIVER = """
import json, os, sys, time
from pathlib import Path
from kiln.cli import configure_process
configure_process()
import ray
from kiln.ray_connection import local_runtime_env
store = int(sys.argv[2]) * 2**20 if int(sys.argv[2]) else None
# the runtime env of the local instances `kiln train` starts (worker niceness, one malloc arena)
ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
         object_store_memory=store, runtime_env=local_runtime_env(None))
# The parent scrapes this node's metrics endpoint for the object store's use.
Path(sys.argv[3]).write_text(str(ray.nodes()[0]["MetricsExportPort"]))
from kiln.data.dataset import prepare_data
from kiln.schema import load_config
from kiln.train.run import run_training
cfg = load_config(sys.argv[1], [])
t0 = time.perf_counter()
data = prepare_data(cfg.data)
prep = time.perf_counter() - t0
t0 = time.perf_counter()
next(iter(data.dataset("train").iter_batches(batch_size=cfg.train.batch_size)))
first = time.perf_counter() - t0
rows = sum(data.sizes().values())
del data
t0 = time.perf_counter()
result = run_training(cfg)
print(json.dumps({"rows": rows, "prepare_s": prep, "first_batch_s": first,
                  "train_job_s": time.perf_counter() - t0,
                  "test_accuracy": result.metrics.get("test_accuracy")}))
"""


def write_tabular(path: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    writer = None
    done = 0
    while done < rows:
        n = min(200_000, rows - done)
        y = rng.integers(0, 4, n)
        x = rng.normal(size=(n, FEATURES)).astype(np.float32)
        x[:, :4] += np.eye(4, dtype=np.float32)[y]
        table = pa.table({**{f"f{i}": x[:, i] for i in range(FEATURES)}, "label": y})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=65_536)
        done += n
    assert writer is not None
    writer.close()


def write_images(path: Path, rows: int) -> None:
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    writer = None
    done = 0
    while done < rows:
        n = min(5_000, rows - done)
        y = rng.integers(0, 3, n)
        cells = []
        for c in y:
            img = rng.integers(0, 60, (IMAGE_SIDE, IMAGE_SIDE, 3)).astype(np.uint8)
            img[4 + 8 * c : 10 + 8 * c, 4:-4] = 220
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            cells.append({"bytes": buf.getvalue(), "path": None})
        table = pa.table({"image": pa.array(cells, type=image_type), "label": y})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=2_000)
        done += n
    assert writer is not None
    writer.close()


def sample_tree(proc: subprocess.Popen) -> dict[str, float]:
    """Peak memory (MB) of the driver and of each Train worker while ``proc`` runs."""
    driver = psutil.Process(proc.pid)
    peak = {"driver_rss": 0.0, "driver_private": 0.0, "worker_rss": 0.0, "worker_private": 0.0}
    workers: set[int] = set()
    while proc.poll() is None:
        try:
            mem = driver.memory_info()
            peak["driver_rss"] = max(peak["driver_rss"], mem.rss / 2**20)
            peak["driver_private"] = max(peak["driver_private"], (mem.rss - mem.shared) / 2**20)
            for child in driver.children(recursive=True):
                try:
                    if "RayTrainWorker" not in " ".join(child.cmdline()):
                        continue
                    workers.add(child.pid)
                    m = child.memory_info()
                    peak["worker_rss"] = max(peak["worker_rss"], m.rss / 2**20)
                    peak["worker_private"] = max(peak["worker_private"], (m.rss - m.shared) / 2**20)
                except psutil.Error:
                    continue
        except psutil.Error:
            break
        time.sleep(0.2)
    peak["workers_seen"] = len(workers)
    return {k: round(v, 1) for k, v in peak.items()}


class ObjectStoreSampler(threading.Thread):
    """Peak object store use (MB) from the node's Prometheus endpoint:
    ``ray_object_store_used_memory`` (in shared memory) and
    ``ray_object_store_memory{Location="SPILLED"}`` (spilled to disk). Ray reports them every second
    here (``RAY_metrics_report_interval_ms=1000`` in the driver's env)."""

    def __init__(self, port_file: Path) -> None:
        super().__init__(daemon=True)
        self.port_file = port_file
        self.peak = {"store_used_mb": 0.0, "store_spilled_mb": 0.0}
        self.samples = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            try:
                port = int(self.port_file.read_text())
                url = f"http://127.0.0.1:{port}/metrics"
                text = urllib.request.urlopen(url, timeout=5).read().decode()
            except (OSError, ValueError):
                continue
            used = spilled = 0.0
            for line in text.splitlines():
                if line.startswith("ray_object_store_used_memory{"):
                    used += float(line.rsplit(" ", 1)[1])
                elif line.startswith("ray_object_store_memory{") and 'Location="SPILLED"' in line:
                    spilled += float(line.rsplit(" ", 1)[1])
            self.samples += 1
            self.peak["store_used_mb"] = max(self.peak["store_used_mb"], used / 2**20)
            self.peak["store_spilled_mb"] = max(self.peak["store_spilled_mb"], spilled / 2**20)


def run_case(
    work: Path, name: str, source: Path, kind: str, workers: int, store_mb: int = 0
) -> dict:
    config = work / f"{name}.yaml"
    data = f"{{source: {source}, label: label" + (", image: image}" if kind == "image" else "}")
    model = "{name: cnn, width: 8}" if kind == "image" else "{name: mlp, hidden: [32]}"
    # Large tabular batches: the point is the data path's memory, not the optimizer's steps.
    batch = 512 if kind == "image" else 4096
    config.write_text(
        f"experiment: {{name: bench-{name}, run_dir: {work / 'runs'}}}\n"
        f"data: {data}\nmodel: {model}\n"
        f"train: {{epochs: 1, batch_size: {batch}, workers: {workers}, cpus_per_worker: 0.5}}\n"
    )
    port_file = work / f"{name}.metrics-port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(config), str(store_mb), str(port_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_metrics_report_interval_ms": "1000"},
    )
    store = ObjectStoreSampler(port_file)
    store.start()
    peak = sample_tree(proc)
    store.stopped.set()
    store.join()
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{err[-3000:]}")
    timings = json.loads(out.strip().splitlines()[-1])
    timings["split_stats_rows_per_s"] = round(timings["rows"] / timings["prepare_s"])
    disk = sum(p.stat().st_size for p in [source]) / 2**20
    store_peak = {k: round(v, 1) for k, v in store.peak.items()}
    return {
        "case": name,
        "parquet_mb": round(disk, 1),
        "store_capacity_mb": store_mb or "default",
        **peak,
        **store_peak,
        "store_samples": store.samples,
        **timings,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the full sizes")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", help="folder for the Parquet files (default: a temp folder)")
    parser.add_argument("--skip-images", action="store_true")
    parser.add_argument(
        "--small-store-mb",
        type=int,
        default=0,
        help="also train the 16x table on a Ray instance with this object store capacity (MB)",
    )
    args = parser.parse_args()
    info = print_machine()
    work = Path(args.work or tempfile.mkdtemp(prefix="kiln-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    cases = []
    for mult in (1, 4, 16):
        path = work / f"tabular-{mult}x.parquet"
        if not path.exists():
            write_tabular(path, int(TABULAR_ROWS * args.scale * mult))
        cases.append(run_case(work, f"tabular-{mult}x", path, "tabular", args.workers))
        print(json.dumps(cases[-1]), flush=True)
    if args.small_store_mb:
        path = work / "tabular-16x.parquet"
        name = f"tabular-16x-store-{args.small_store_mb}mb"
        cases.append(run_case(work, name, path, "tabular", args.workers, args.small_store_mb))
        print(json.dumps(cases[-1]), flush=True)
    if not args.skip_images:
        for mult in (1, 4):
            path = work / f"images-{mult}x.parquet"
            if not path.exists():
                write_images(path, int(IMAGE_ROWS * args.scale * mult))
            cases.append(run_case(work, f"images-{mult}x", path, "image", args.workers))
            print(json.dumps(cases[-1]), flush=True)
    by = {c["case"]: c for c in cases}
    ratios = {
        "driver_rss_16x_over_1x": round(
            by["tabular-16x"]["driver_rss"] / by["tabular-1x"]["driver_rss"], 3
        ),
        "worker_rss_16x_over_1x": round(
            by["tabular-16x"]["worker_rss"] / max(by["tabular-1x"]["worker_rss"], 1e-9), 3
        ),
    }
    if "images-4x" in by:
        ratios["driver_rss_images_4x_over_1x"] = round(
            by["images-4x"]["driver_rss"] / by["images-1x"]["driver_rss"], 3
        )
    print(json.dumps({"machine": info, "scale": args.scale, "cases": cases, "ratios": ratios}))


if __name__ == "__main__":
    main()
