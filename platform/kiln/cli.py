"""The ``kiln`` console script: one parser, one module per subcommand, imported lazily.

``kiln --help`` imports neither torch nor ray: command modules import their heavy
dependencies inside ``run``. A KilnError becomes one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

# name -> module with HELP, add_arguments(parser) and run(args) -> int
COMMANDS: dict[str, str] = {
    "validate": "kiln.commands.validate",
    "train": "kiln.commands.train",
    "data": "kiln.commands.data",
    "compress": "kiln.commands.compress",
    "tune": "kiln.commands.tune",
    "submit": "kiln.commands.submit",
    "jobs": "kiln.commands.jobs",
    "cluster": "kiln.commands.cluster",
    "tracking": "kiln.commands.tracking",
    "serve": "kiln.commands.serve",
    "rollout": "kiln.commands.rollout",
    "predict": "kiln.commands.predict",
    "monitor": "kiln.commands.monitor",
}


def build_parser() -> argparse.ArgumentParser:
    from kiln.version import __version__

    parser = argparse.ArgumentParser(
        prog="kiln", description="Train, tune, compress and serve PyTorch models on Ray."
    )
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and Ray's own logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        cmd.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show tracebacks and Ray's logs",
        )
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from kiln.errors import KilnError

    parser = build_parser()
    # key=value overrides may come after options (kiln train CONFIG --json train.epochs=3): argparse
    # leaves those as extras, which are overrides when the command takes them.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and all(
            "=" in e and not e.startswith("-") for e in extra
        ):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False) or os.environ.get("KILN_DEBUG"))
    args.debug = debug
    try:
        return int(args._run(args) or 0)
    except KilnError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an environment failure, not the user's input
        if debug:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"error: {type(exc).__name__}: {first} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
