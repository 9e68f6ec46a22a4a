"""Send one digits image to a served model's convenience endpoint (used by `make demo`).

python bench/demo_request.py runs/demo/serve.json
"""

import base64
import json
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from kiln.data.builtin import load_builtin  # noqa: E402

served = json.loads(Path(sys.argv[1]).read_text().splitlines()[-1])
model = served["models"][0]
table = load_builtin("digits")
image = table.column("image")[0].as_py()["bytes"]
body = json.dumps({"images": [base64.b64encode(image).decode()]}).encode()
url = f"{served['url'].rstrip('/')}/v2/models/{model['name']}/predict"
request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=30) as response:
    answer = json.loads(response.read())
print(f"POST {url} -> {json.dumps(answer)}")
formats = {
    m["version"]: m.get("format", "?") for m in served["models"] if m["name"] == model["name"]
}
version = answer.get("model_version")
print(
    f"true label: {table.column('label')[0].as_py()}, served version {version} "
    f"({formats.get(version, '?')})"
)
