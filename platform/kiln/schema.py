"""The full Kiln config, composed once: every package owns its section, this module joins them.

Only the top layer (commands, job entry points) imports this module; a lower layer that needs to
validate a whole config takes the schema class as an argument (``type(config)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.compress.config import CompressJobConfig
from kiln.config import load_config as load_section_config
from kiln.config import validate_config as validate_section_config
from kiln.serve.config import ServeJobConfig
from kiln.tune.config import TuneJobConfig


class KilnConfig(ServeJobConfig, TuneJobConfig, CompressJobConfig):
    """A whole Kiln config: the training sections, plus one section per later job kind.

    Bases in reverse order, so that sections dump as experiment, data, model, train, compress, tune,
    serve.
    """


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> KilnConfig:
    """Load, override and validate a whole Kiln config. Raises ConfigError naming the dotted key."""
    return load_section_config(path, overrides, KilnConfig)


def validate_config(data: dict[str, Any]) -> KilnConfig:
    """Validate plain data into a KilnConfig; raises ConfigError naming the dotted key."""
    return validate_section_config(data, KilnConfig)
