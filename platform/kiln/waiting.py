"""The one poll-until-timeout loop: wait on observable state, never on a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """The condition did not hold within the timeout; the message names what was awaited."""


def wait_until(
    condition: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.1,
    max_interval: float = 1.0,
) -> T:
    """Call ``condition`` until it returns a truthy value; return that value.

    The interval between calls starts at ``interval`` and doubles up to ``max_interval``.
    Raises WaitTimeout naming ``what`` after ``timeout`` seconds (at least one call is always made,
    and a last one at the deadline). Exceptions raised by ``condition`` propagate.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        value = condition()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, max_interval)
