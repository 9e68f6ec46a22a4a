"""Compress job entrypoint: python jobs/compress.py CONFIG [key=value ...]

Runs as a plain script or as a Ray job (``ray job submit --working-dir . -- python jobs/compress.py
...``).
"""

import sys
from pathlib import Path

# The kiln source shipped beside this script (a checkout sent as the job's working dir) wins over
# whatever kiln the node has installed; without it, kiln comes from the runtime env's py_modules
# (``kiln submit``) or from the installed package. As in jobs/train.py.
_CHECKOUT = Path(__file__).resolve().parents[1] / "platform"
if (_CHECKOUT / "kiln" / "__init__.py").is_file():
    sys.path.insert(0, str(_CHECKOUT))

# main() sets up the process first (kiln.cli.configure_process: environment and logging).
from kiln.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compress", *sys.argv[1:]]))
