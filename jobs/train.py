"""Train job entrypoint: python jobs/train.py CONFIG [key=value ...] [--json]

Runs as a plain script or as a Ray job, through ``kiln submit train CONFIG`` or Ray's own CLI
(``ray job submit --working-dir . -- python jobs/train.py configs/train/digits_cnn.yaml``).
"""

import sys
from pathlib import Path

# The kiln source shipped beside this script (a checkout sent as the job's working dir) wins over
# whatever kiln the node has installed; without it, kiln comes from the runtime env's py_modules
# (``kiln submit``) or from the installed package.
_CHECKOUT = Path(__file__).resolve().parents[1] / "platform"
if (_CHECKOUT / "kiln" / "__init__.py").is_file():
    sys.path.insert(0, str(_CHECKOUT))

# main() sets up the process first (kiln.cli.configure_process: environment and logging).
from kiln.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
