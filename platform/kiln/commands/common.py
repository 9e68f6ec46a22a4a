"""Argument helpers and output rendering shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML config file")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=3"
    )


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object as the last stdout line"
    )


def emit_json(obj: Any) -> None:
    """The machine-readable result: one line, last on stdout."""
    sys.stdout.flush()
    print(json.dumps(obj, default=str), flush=True)


def say(args: argparse.Namespace, text: str) -> None:
    """Human-facing progress: stdout normally, stderr under --json so stdout stays parseable."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)
