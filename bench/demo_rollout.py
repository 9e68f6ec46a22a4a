"""Send digits images to a served model until its rollout ends (used by `make demo`), then print the
share each version answered and the rollout's outcome. Bounded: at most ``--seconds``.

    python bench/demo_rollout.py runs/demo/serve.json [--run-dir runs] [--seconds 120]
"""

import argparse
import base64
import json
import random
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from kiln.data.builtin import load_builtin  # noqa: E402
from kiln.rollout.core.store import ACTIVE, RolloutStore  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("serve_json")
parser.add_argument("--run-dir", default="runs")
parser.add_argument("--seconds", type=float, default=120.0)
args = parser.parse_args()
served = json.loads(Path(args.serve_json).read_text().splitlines()[-1])
model = served["models"][0]["name"]
table = load_builtin("digits")
# Every image of the set in a seeded random order: traffic like the training data, so monitoring
# sees no drift (a few images sent over and over would be a real shift: their brightness and outputs
# are not the data's).
order = random.Random(0).sample(range(table.num_rows), table.num_rows)
images = [base64.b64encode(table.column("image")[i].as_py()["bytes"]).decode() for i in order]
url = f"{served['url'].rstrip('/')}/v2/models/{model}/predict"
answered, failed = Counter(), 0
store = RolloutStore(args.run_dir, model)
deadline = time.monotonic() + args.seconds
record = store.load()
i = 0
while time.monotonic() < deadline and record is not None and record.phase in ACTIVE:
    body = json.dumps({"images": [images[i % len(images)]]}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answered[json.loads(response.read())["model_version"]] += 1
    except OSError:
        failed += 1
    i += 1
    if i % 20 == 0:
        record = store.load()
record = store.load()
print(
    f"{sum(answered.values())} answered "
    f"({', '.join(f'v{v}: {n}' for v, n in sorted(answered.items()))}), "
    f"{failed} failed; rollout {record.phase if record else 'missing'}: "
    f"{record.reason if record else ''}"
)
sys.exit(0 if record is not None and record.phase == "promoted" and failed == 0 else 1)
