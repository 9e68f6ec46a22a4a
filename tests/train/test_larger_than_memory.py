"""Training on a table larger than Ray's object store: the splits stream through Ray Data, and the
driver's memory does not grow with the data.

The run needs its own Ray instance (a deliberately small object store is set when Ray starts), so
it runs in a subprocess that starts one and calls the training library; this test samples the
subprocess's resident memory with psutil while it runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import kiln_env

pytestmark = [pytest.mark.slow, pytest.mark.module_seconds(130)]

OBJECT_STORE = 100 << 20
ROWS, FEATURES = 2_000_000, 64  # 512 MB of float32 features: 5x the object store

DRIVER = """
import json, logging, sys
from kiln.cli import configure_process
configure_process()
import psutil, ray
ray.init(address="local", num_cpus=2, object_store_memory={store}, include_dashboard=True,
         dashboard_host="127.0.0.1", logging_level=logging.ERROR, log_to_driver=False)
from kiln.schema import load_config
from kiln.train.run import run_training
import mlflow, ray.data, ray.train.torch  # what the run imports: start-up, not data
cfg = load_config(sys.argv[1], [])
mem = psutil.Process().memory_info()
print("BASELINE", mem.rss - mem.shared, file=sys.stderr, flush=True)
result = run_training(cfg)
print(json.dumps(result.to_dict()))
"""


def _write_table(path, rows, features):
    rng = np.random.default_rng(0)
    written = 0
    writer = None
    while written < rows:
        n = min(100_000, rows - written)
        y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, features)).astype(np.float32)
        x[:, 0] += y  # one informative feature
        cols = {f"f{i}": x[:, i] for i in range(features)}
        table = pa.table({**cols, "label": y})
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=50_000)
        written += n
    assert writer is not None
    writer.close()


def test_a_table_larger_than_the_object_store_trains_with_flat_driver_memory(tmp_path):
    data = tmp_path / "big.parquet"
    _write_table(data, ROWS, FEATURES)
    raw_bytes = ROWS * FEATURES * 4
    assert raw_bytes > 2 * OBJECT_STORE
    config = tmp_path / "big.yaml"
    config.write_text(
        f"""
experiment: {{name: big-table, run_dir: {tmp_path / "runs"}}}
data: {{source: {data}, label: label}}
model: {{name: mlp, hidden: [16], dropout: 0.0}}
train: {{epochs: 1, batch_size: 8192, workers: 2, cpus_per_worker: 0.5, lr: 0.01}}
"""
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER.format(store=OBJECT_STORE), str(config)],
        env=kiln_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    driver = psutil.Process(proc.pid)
    peak = 0  # private memory: resident less shared pages (Ray's object store maps as shared)
    while proc.poll() is None:
        try:
            mem = driver.memory_info()
            peak = max(peak, mem.rss - mem.shared)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    baseline = int(next(line for line in err.splitlines() if "BASELINE" in line).split()[1])
    result = json.loads(out.strip().splitlines()[-1])
    assert sum(result["split_sizes"].values()) == ROWS
    assert result["metrics"]["test_accuracy"] > 0.6  # it learned from the informative feature
    # The driver never holds the rows: its growth during the run (Ray Data's executor, MLflow, the
    # model, evaluation) stays well below the data's size. Seen on a shared 2-core machine, private
    # growth: about 100 MB for 32 MB of data, 160-190 MB for 256 MB (not yet flat: see the report).
    assert peak - baseline < raw_bytes / 2, (peak, baseline, raw_bytes)
