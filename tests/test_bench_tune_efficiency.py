"""bench/tune_efficiency.py in its quick mode (2 seeds, the digits task, 4 trials x 2 epochs), so
that the benchmark cannot rot: it runs, every method gets its seeds, the targets come from random
search alone, and the report, JSON and PNG are written. No Ray (the overhead section is skipped).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, kiln_env

# about 25 s on an idle 2-core machine, 55 s under load
pytestmark = [pytest.mark.slow, pytest.mark.module_seconds(15)]


def test_quick_benchmark_runs_and_reports_every_method(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "bench" / "tune_efficiency.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, env=kiln_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "digits_cnn: targets from random_fifo's 2 seeds" in proc.stdout
    result = json.loads((out / "tune_efficiency.json").read_text())
    digits = result["efficiency"]["digits_cnn"]
    assert set(digits["methods"]) == {"random_fifo", "random_asha", "tpe_asha", "tpe_asha_fill"}
    for row in digits["methods"].values():
        assert row["seeds"] == 2
        for target in ("p75", "p50"):
            low, high = row[target]["ratio_ci90"]
            assert 0 < low <= high and 0 <= row[target]["reached"] <= 2
    assert digits["methods"]["random_fifo"]["p75"]["ratio_to_random_fifo"] == 1.0
    assert (out / "tune_efficiency_digits_cnn.png").stat().st_size > 10_000

    runs = [
        json.loads(line) for line in (out / "tune_efficiency_runs.jsonl").read_text().splitlines()
    ]
    assert len(runs) == 8
    by = {(r["method"], r["seed"]): r for r in runs}
    for seed in (0, 1):
        fifo, asha = by["random_fifo", seed], by["random_asha", seed]
        assert len(fifo["trace"]) == 4 * 2  # every trial trained to the end
        # Same seed, same random configs: ASHA's reports are those of the same trials under FIFO,
        # cut short (the curves are deterministic).
        full = {(t, e): v for t, e, v, _ in fifo["trace"]}
        assert all(full[t, e] == v for t, e, v, _ in asha["trace"])
        assert len(asha["trace"]) <= len(fifo["trace"])
        # The budget in epochs: spent to the last epoch, on more trials when ASHA stopped some.
        fill = by["tpe_asha_fill", seed]
        assert len(fill["trace"]) == 4 * 2
        assert fill["trials_started"] >= 4 + (fill["stopped_early"] > 0)

    # Saved runs are not run again: --report-only (and a re-run) only analyse them.
    again = subprocess.run(
        [*cmd, "--report-only"], env=kiln_env(), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and "targets from" in again.stdout
    assert not re.search(r"seed +\d+: final best", again.stdout)
