"""Compress job entrypoint: python jobs/compress.py CONFIG [key=value ...]

Runs as a plain script or as a Ray job (``ray job submit --working-dir . -- python jobs/compress.py
...``).
"""

import sys
from pathlib import Path

try:
    import kiln  # noqa: F401  (installed, or shipped by the job's runtime env)
except ImportError:  # a source checkout: the package lives in platform/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["compress", *sys.argv[1:]]))
