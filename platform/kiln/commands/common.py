"""Argument helpers and output rendering shared by the subcommands."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

# Where emit_json writes while json_stdout() sends everything else to stderr.
_result_stream: TextIO | None = None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML config file")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=3"
    )


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object as the last stdout line"
    )


@contextlib.contextmanager
def json_stdout(enabled: bool, to_exit: bool = False) -> Iterator[None]:
    """Under ``--json``, stdout belongs to the result line alone: whatever else the command, or a
    library it calls, prints to stdout goes to stderr (Ray's driver prints worker warnings such as
    "(raylet) WARNING: ... worker processes have been started" to stdout, also from a background
    thread and at exit), and ``emit_json`` writes to the real stdout. ``to_exit`` (the CLI entry)
    keeps it so until the process exits, and also moves file descriptor 1 to stderr: C extensions
    and child processes write there directly, past ``sys.stdout``. Does nothing when not
    ``enabled``."""
    global _result_stream
    if not enabled:
        yield
        return
    saved = sys.stdout
    _result_stream = _steal_stdout_fd() if to_exit else saved
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        if not to_exit:
            sys.stdout, _result_stream = saved, None


def _steal_stdout_fd() -> TextIO:
    """Point file descriptor 1 at stderr for the rest of the process; returns a stream on a copy
    of the original stdout, for the result line."""
    sys.stdout.flush()
    result = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return result


def emit_json(obj: Any) -> None:
    """The machine-readable result: one line, last on stdout."""
    sys.stdout.flush()
    print(json.dumps(obj, default=str), file=_result_stream or sys.stdout, flush=True)


def say(args: argparse.Namespace, text: str) -> None:
    """Human-facing progress: stdout normally, stderr under --json so stdout stays parseable."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)
