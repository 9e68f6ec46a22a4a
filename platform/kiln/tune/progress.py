"""Live progress of a sweep: one short line per trial start, epoch and end.

Ray Tune pickles its callbacks with the sweep and uses that copy when the sweep is resumed, so
the callback holds no output stream: it looks up the current process's sink by the sweep's key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ray.tune import Callback

from kiln.tune.trial import TIME_ATTR, trial_number

_SINKS: dict[str, Callable[[str], None]] = {}


@contextmanager
def progress_sink(key: str, sink: Callable[[str], None] | None) -> Iterator[None]:
    """Route the progress lines of sweep ``key`` to ``sink`` while the block runs."""
    if sink is not None:
        _SINKS[key] = sink
    try:
        yield
    finally:
        _SINKS.pop(key, None)


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def format_params(params: dict) -> str:
    return " ".join(f"{k}={format_value(v)}" for k, v in params.items())


class SweepProgress(Callback):
    """Tune callback printing trial events through the sink registered for ``key``."""

    budget_epochs: int | None = None  # for copies saved before the attribute existed

    def __init__(
        self,
        key: str,
        max_epochs: int,
        metrics: list[str],
        num_samples: int,
        budget_epochs: int | None = None,
    ):
        self.key, self.max_epochs, self.metrics = key, max_epochs, metrics
        self.num_samples, self.budget_epochs = num_samples, budget_epochs
        self._started = time.monotonic()

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._started = time.monotonic()  # elapsed time of this driver, also after a resume

    def _say(self, text: str) -> None:
        sink = _SINKS.get(self.key)
        if sink is not None:
            sink(f"[{time.monotonic() - self._started:6.0f}s] {text}")

    def _metrics(self, result: dict) -> str:
        return "  ".join(
            f"{m} {format_value(result[m])}" for m in self.metrics if m in (result or {})
        )

    def on_trial_start(self, iteration, trials, trial, **info):
        done = (trial.last_result or {}).get(TIME_ATTR)
        how = f"resume after epoch {done}" if done else "start  "
        self._say(
            f"trial {trial_number(trial.experiment_tag):>3} {how} {format_params(trial.config)}"
        )

    def on_trial_result(self, iteration, trials, trial, result, **info):
        done = result.get(TIME_ATTR, 0)
        self._say(
            f"trial {trial_number(trial.experiment_tag):>3} epoch {done}/{self.max_epochs}  "
            f"{self._metrics(result)}"
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        done = result.get(TIME_ATTR, 0)
        how = "done   " if done >= self.max_epochs else f"stopped at epoch {done}"
        finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial) + 1
        if self.budget_epochs:
            spent = sum(int((t.last_result or {}).get(TIME_ATTR) or 0) for t in trials)
            count = f"{finished} trials, {spent}/{self.budget_epochs} epochs of the budget"
        else:
            count = f"{finished}/{self.num_samples} trials"
        self._say(
            f"trial {trial_number(trial.experiment_tag):>3} {how}  {self._metrics(result)}  "
            f"({count})"
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(
            f"trial {trial_number(trial.experiment_tag):>3} failed (see its error in the results)"
        )
