"""Following, inspecting and stopping submitted jobs; a finished job's outcome (status, summary,
error line)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from kiln.errors import KilnError
from kiln.waiting import WaitTimeout, wait_until

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobFailedError(KilnError):
    """A submitted job ended FAILED or STOPPED. The exit code is the job's own when it has one."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class JobState:
    """One job as the Jobs API reports it."""

    submission_id: str
    status: str
    job: str | None  # kiln job kind (metadata), None for jobs not submitted by kiln
    entrypoint: str
    message: str | None
    start_time: float | None  # unix seconds
    end_time: float | None
    driver_exit_code: int | None

    @classmethod
    def from_details(cls, d) -> JobState:
        ms = lambda v: v / 1000.0 if v else None  # noqa: E731
        return cls(
            submission_id=d.submission_id or d.job_id,
            status=str(getattr(d.status, "value", d.status)),
            job=(d.metadata or {}).get("kiln.job"),
            entrypoint=d.entrypoint,
            message=d.message,
            start_time=ms(d.start_time),
            end_time=ms(d.end_time),
            driver_exit_code=getattr(d, "driver_exit_code", None),
        )

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JobOutcome:
    """How a job ended: its status, exit code, the JSON summary line it printed and its error
    line."""

    submission_id: str
    status: str
    driver_exit_code: int | None
    summary: dict[str, Any] | None
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def api_errors(client, submission_id: str | None = None) -> Iterator[None]:
    """Turn the Jobs SDK's exceptions into one-line KilnErrors."""
    from ray.exceptions import AuthenticationError

    from kiln.cluster.client import auth_error

    address = client.get_address()
    try:
        yield
    except AuthenticationError as exc:
        raise auth_error(address, exc) from None
    except ConnectionError:
        raise KilnError(f"lost the connection to the Ray Jobs API at {address}") from None
    except RuntimeError as exc:
        text = str(exc)
        if submission_id and ("does not exist" in text or "404" in text):
            raise KilnError(
                f"no job '{submission_id}' on {address} ('kiln jobs list' shows the jobs)"
            ) from None
        raise KilnError(f"the Ray Jobs API at {address} refused: {api_reason(text)}") from None


def api_reason(text: str) -> str:
    """The useful line of a Jobs API failure: the server's own last line (its exception) when it
    sent one."""
    lines = [line.strip() for line in text.strip().rstrip(".").splitlines() if line.strip()]
    if not lines:
        return "no reason given"
    return lines[-1][:500] if len(lines) > 1 else lines[0][:500]


def job_state(client, submission_id: str) -> JobState:
    with api_errors(client, submission_id):
        return JobState.from_details(client.get_job_info(submission_id))


def list_jobs(client) -> list[JobState]:
    """Every job the cluster knows, oldest first."""
    with api_errors(client):
        jobs = [JobState.from_details(d) for d in client.list_jobs()]
    return sorted(jobs, key=lambda j: j.start_time or 0.0)


def job_logs(client, submission_id: str) -> str:
    with api_errors(client, submission_id):
        return client.get_job_logs(submission_id)


def follow_logs(client, submission_id: str, write: Callable[[str], None]) -> None:
    """Stream the job's logs to ``write`` until the job ends (Ray's log tail over a websocket).

    Falls back to polling the whole log when the stream breaks off.
    """
    printed = 0

    async def tail() -> None:
        nonlocal printed
        async for chunk in client.tail_job_logs(submission_id):
            write(chunk)
            printed += len(chunk)

    import aiohttp

    def caught_up() -> bool:
        nonlocal printed
        state = job_state(client, submission_id)
        logs = client.get_job_logs(submission_id)
        if len(logs) > printed:
            write(logs[printed:])
            printed = len(logs)
        return state.finished

    with api_errors(client, submission_id):
        try:
            asyncio.run(tail())
        except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError):
            pass  # a broken stream is not fatal: the polling below catches up
        # Anything the stream missed, then until the job ends.
        wait_until(caught_up, math.inf, f"job {submission_id} to end", interval=1.0)


def wait_until_finished(
    client, submission_id: str, timeout: float | None = None, poll: float = 1.0
) -> JobState:
    """Poll every ``poll`` seconds until the job reaches SUCCEEDED, FAILED or STOPPED; returns its
    final state. Raises KilnError after ``timeout`` seconds (None: no limit)."""
    last: list[JobState] = []

    def finished() -> JobState | None:
        state = job_state(client, submission_id)
        last[:] = [state]
        return state if state.finished else None

    limit = math.inf if timeout is None else timeout
    try:
        return wait_until(finished, limit, f"job {submission_id}", interval=poll, max_interval=poll)
    except WaitTimeout:
        raise KilnError(
            f"job {submission_id} is still {last[0].status} after {timeout:g}s"
        ) from None


def summary_line(logs: str) -> dict[str, Any] | None:
    """The job's own result: the last log line that is a JSON object (kiln commands print it under
    --json)."""
    for line in reversed(logs.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def error_line(logs: str, state: JobState) -> str | None:
    """Why the job did not succeed, in one line: the job's own ``error: ...`` line (kiln's CLI
    prints one), else the last line that names an error, else the Jobs API's message."""
    lines = [line.strip() for line in logs.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: ") :]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line[:500]
    if state.message and state.message.strip():
        return state.message.strip().splitlines()[0][:500]
    return None


def job_outcome(client, submission_id: str) -> JobOutcome:
    """The outcome of a finished job (call after wait_until_finished)."""
    state = job_state(client, submission_id)
    logs = job_logs(client, submission_id)
    error = None if state.status == "SUCCEEDED" else error_line(logs, state)
    if state.status == "STOPPED":
        error = "stopped"
    return JobOutcome(
        submission_id=submission_id,
        status=state.status,
        driver_exit_code=state.driver_exit_code,
        summary=summary_line(logs) if state.status == "SUCCEEDED" else None,
        error=error,
    )


def raise_unless_succeeded(outcome: JobOutcome) -> None:
    """JobFailedError (exit code: the job's own, else 1) unless the job SUCCEEDED."""
    if outcome.status == "SUCCEEDED":
        return
    code = (
        outcome.driver_exit_code
        if outcome.driver_exit_code and 0 < outcome.driver_exit_code < 126
        else 1
    )
    raise JobFailedError(
        f"job {outcome.submission_id} {outcome.status}: {outcome.error or 'no error line'}", code
    )


def stop_job(client, submission_id: str, timeout: float = 60.0) -> JobState:
    """Ask Ray to stop the job (SIGTERM, then SIGKILL) and wait until it has ended. Returns its
    final state."""
    state = job_state(client, submission_id)
    if state.finished:
        return state
    with api_errors(client, submission_id):
        client.stop_job(submission_id)
    return wait_until_finished(client, submission_id, timeout=timeout)


def stdout_writer(to_stderr: bool) -> Callable[[str], None]:
    stream = sys.stderr if to_stderr else sys.stdout

    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    return write
