"""The ``kiln`` console script: one parser, one module per subcommand, imported lazily.

``kiln --help`` imports neither torch nor ray: command modules import their heavy
dependencies inside ``run``. A KilnError becomes one ``error:`` line and exit code 2.

This is also where the process is set up: ``configure_process`` sets the environment Ray, Tune and
MLflow read at import and configures logging. It runs first in ``main`` (and so in every
``jobs/*.py``, which call ``main``); library modules never write ``os.environ`` or the root logger.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

# The process environment Kiln runs Ray, Tune and MLflow with. Set with setdefault: a user's own
# setting wins. Ray reads most of these at import, so they must be set before ray is imported;
# Ray workers of a local instance inherit them from the driver.
PROCESS_ENV: dict[str, str] = {
    "RAY_TRAIN_V2_ENABLED": "1",  # Ray Train V2 (the default in Ray 2.60; pinned for clarity)
    "RAY_DEDUP_LOGS": "1",  # one line for a message every worker prints
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage reporting, and no prompt about it
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # the CLI prints its own progress
    # Ray Data configures its own logger at import and reads its level from here: without it, its
    # execution plans (INFO) and a warning about the disabled progress bars reach the console and
    # follow a command's one error line. --debug sets INFO.
    "RAY_DATA_LOG_LEVEL": "ERROR",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # no CSV/JSON/TensorBoard files Kiln does not use
    "RAY_AIR_NEW_OUTPUT": "0",  # no Tune/Train status tables in the terminal
    # A resumable sweep: Tune saves its experiment state at least every 2 s (default: adaptive,
    # up to minutes), so a sweep killed with its driver resumes from recent trial state.
    "TUNE_GLOBAL_CHECKPOINT_S": "2",
    # Ray Train notices a dead worker within half a second (default 2 s).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # MLflow configures its loggers at import from this; INFO lines about migrations are noise.
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}

# Libraries that log hints on the root logger (``logging.warning(...)``), below ERROR, without
# --debug: ONNX Runtime's quantizer and ONNX.
QUIET_PACKAGES = ("onnxruntime", "onnx")
QUIET_LOGGERS = ("onnxruntime", "onnx", "alembic", "alembic.runtime.migration")


class _QuietPackages(logging.Filter):
    """Drops records below ERROR that QUIET_PACKAGES log through the root logger (their
    ``logging.warning(...)`` calls name no logger of their own, only their source file does)."""

    def __init__(self, packages: tuple[str, ...]) -> None:
        super().__init__()
        self.parts = tuple(f"{os.sep}{p}{os.sep}" for p in packages)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        return not any(part in record.pathname for part in self.parts)


def configure_process(debug: bool = False) -> None:
    """Set up this process for Kiln: the environment of PROCESS_ENV (each variable only where the
    user has not set it), and logging (a root handler on stderr at WARNING, INFO under ``debug``;
    without ``debug`` ONNX Runtime's and ONNX's hints and alembic's migration lines are dropped).

    Call it once, first, in an entry point (``main``, the jobs, the test suite's conftest), before
    ray or mlflow is imported. Returns nothing; raises nothing. Calling it again changes nothing but
    the levels.
    """
    if debug:
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "INFO")
    for name, value in PROCESS_ENV.items():
        os.environ.setdefault(name, value)
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_kiln", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._kiln = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for old in [f for f in handler.filters if isinstance(f, _QuietPackages)]:
        handler.removeFilter(old)
    if not debug:
        handler.addFilter(_QuietPackages(QUIET_PACKAGES))
    root.setLevel(logging.INFO if debug else logging.WARNING)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if debug else logging.ERROR)


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
    "console": "kiln.commands.console",
    "model": "kiln.commands.model",
}


# The positional lists that take key=value overrides: a job's CONFIG overrides, and the targets of
# `kiln serve start` (configs, model URIs and overrides).
_OVERRIDE_LISTS = ("overrides", "targets")


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


def parse_command_line(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> argparse.Namespace:
    """Parse ``kiln ARGV``; exits 2 with argparse's usage line on a mistake."""
    # key=value overrides may come anywhere among the options (kiln train CONFIG --json
    # train.epochs=3, kiln serve start MODEL --port 0 serve.deployment.replicas=2): argparse leaves
    # those after an option as extras, which join the command's list of overrides when it has one.
    args, extra = parser.parse_known_args(argv)
    if extra:
        overrides = next(
            (value for d in _OVERRIDE_LISTS if isinstance(value := getattr(args, d, None), list)),
            None,
        )
        if overrides is not None and all("=" in e and not e.startswith("-") for e in extra):
            overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run ``kiln ARGV``. Returns the exit code: 0, 2 for a KilnError (one ``error:`` line), 130 on
    Ctrl-C, 1 for anything else (a bug or an environment failure)."""
    # Before anything imports ray or mlflow (the parser imports no command's heavy dependencies).
    configure_process(debug=_debug_requested(argv))
    from kiln.errors import KilnError, first_line

    parser = build_parser()
    args = parse_command_line(parser, argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False) or os.environ.get("KILN_DEBUG"))
    args.debug = debug
    from kiln.commands.common import json_stdout

    try:
        with json_stdout(bool(getattr(args, "json", False)), to_exit=True):
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
        first = first_line(exc) if str(exc).strip() else ""
        print(
            f"error: {type(exc).__name__}: {first} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def _debug_requested(argv: list[str] | None) -> bool:
    """``--debug`` anywhere on the command line, or KILN_DEBUG set (before argparse has run)."""
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or bool(os.environ.get("KILN_DEBUG"))


if __name__ == "__main__":
    sys.exit(main())
