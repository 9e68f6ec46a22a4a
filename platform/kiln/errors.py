"""User-facing errors: one line naming the problem, exit code 2 at the CLI."""

from __future__ import annotations


class KilnError(Exception):
    """A mistake the user can fix (bad config, missing file, bad request).

    The CLI prints ``error: <message>`` and exits with code 2, no traceback
    unless ``--debug`` is given.
    """

    exit_code = 2


class ConfigError(KilnError):
    """The config (file or override) is invalid; the message names the dotted key."""


class DataError(KilnError):
    """The data source cannot be read or does not match the config."""


class ResourceError(KilnError):
    """The cluster cannot place what the job asks for."""


class ModelError(KilnError):
    """A model URI or model artifact cannot be resolved or loaded."""


def first_line(exc: BaseException, limit: int = 500) -> str:
    """The first non-empty line of an exception's message (its type name when the message is empty),
    at most ``limit`` characters: what a one-line error shows of an underlying failure."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__


def telling_line(message: str, limit: int = 400) -> str:
    """The most telling line of a (Ray) error message, at most ``limit`` characters: HAProxy's first
    ``[ALERT]`` (its output starts with notices and warnings, and ends with "Exiting"), else the
    last line naming an error (Ray wraps the cause in a traceback and context lines), else the
    last line; warnings skipped; "no message" for none."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    for line in lines:
        if "[ALERT]" in line:
            return line[:limit]
    telling = [line for line in lines if "[WARNING]" not in line] or lines
    for line in reversed(telling):
        if ("Error" in line or "error" in line) and not line.startswith("File "):
            return line[:limit]
    return (telling[-1] if telling else "no message")[:limit]
