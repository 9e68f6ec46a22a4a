"""Print one field of the last JSON line a `kiln ... --json` command wrote (used by `make demo`).

python bench/json_field.py runs/demo/train.json model_uri
python bench/json_field.py runs/demo/compress.json selected --version   # models:/NAME/9 -> 9
"""

import json
import sys
from pathlib import Path

args = [a for a in sys.argv[1:] if a != "--version"]
if len(args) != 2:
    sys.exit("usage: json_field.py FILE KEY [--version]")
value = json.loads(Path(args[0]).read_text().splitlines()[-1])[args[1]]
print(str(value).rsplit("/", 1)[1] if "--version" in sys.argv else value)
