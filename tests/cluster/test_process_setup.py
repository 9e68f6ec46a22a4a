"""kiln.cli.configure_process: the one place that sets the environment and logging of a Kiln process
(the CLI and the jobs call it first). Run in a fresh interpreter: it changes process-wide state."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, kiln_env

PROBE = r"""
import json, logging, os, sys
from kiln.cli import PROCESS_ENV, configure_process

configure_process(debug=False)
configure_process(debug=False)  # twice: still one handler
root = logging.getLogger()
noisy = logging.LogRecord("root", logging.WARNING, "/x/site-packages/onnxruntime/quantization/q.py",
                          1, "hint", None, None)
ours = logging.LogRecord("kiln.x", logging.WARNING, "/x/kiln/x.py", 1, "ours", None, None)
handlers = [h for h in root.handlers if getattr(h, "_kiln", False)]
print(json.dumps({
    "env": {k: os.environ.get(k) for k in PROCESS_ENV},
    "handlers": len(handlers),
    "level": root.level,
    "onnx_dropped": not handlers[0].filter(noisy),
    "ours_kept": bool(handlers[0].filter(ours)),
    "ray_imported": "ray" in sys.modules or "mlflow" in sys.modules,
}))
"""


def test_configure_process_sets_defaults_the_user_can_override_and_quiets_onnx():
    env = kiln_env({"RAY_DEDUP_LOGS": "0"})  # the user's own setting
    for name in ("RAY_DATA_DISABLE_PROGRESS_BARS", "MLFLOW_LOGGING_LEVEL", "KILN_DEBUG"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["env"]["RAY_DEDUP_LOGS"] == "0"
    assert out["env"]["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    assert out["env"]["MLFLOW_LOGGING_LEVEL"] == "WARNING"
    assert out["handlers"] == 1 and out["level"] == 30  # WARNING
    assert out["onnx_dropped"] and out["ours_kept"]
    assert not out["ray_imported"]  # set up before any heavy import
