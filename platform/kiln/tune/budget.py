"""A sweep's budget in trial epochs (``tune.budget_epochs``).

Trials keep starting until the sweep's trials have trained that many epochs in all; then Ray Tune
ends the sweep and stops the trials still running. With ASHA, the epochs it saves by stopping weak
trials go to more trials instead of being left unspent (BENCHMARKS: Tuning).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune.result import EXPR_RESULT_FILE
from ray.tune.stopper import Stopper

from kiln.tune.trial import TIME_ATTR


class EpochBudget(Stopper):
    """Ends the sweep once its trials' epochs add up to ``budget``.

    Each trial's count is its latest epoch (not a sum of reports), so a trial restarted from its
    checkpoint is not counted twice. A resumed sweep gets the copy of the stopper Ray Tune saved
    when the sweep started, before any result: it first reads the epochs already spent from the
    trials' ``result.json`` files in ``tune_dir``.
    """

    def __init__(self, budget: int, tune_dir: str):
        self.budget, self.tune_dir = budget, tune_dir
        self.epochs: dict[str, int] = {}
        self._counted_saved = True  # a new sweep has nothing saved yet

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._counted_saved = False

    def _count(self, trial_id: str, done: Any) -> None:
        if isinstance(done, (int, float)):
            self.epochs[trial_id] = max(self.epochs.get(trial_id, 0), int(done))

    def _count_saved(self) -> None:
        if self._counted_saved:
            return
        self._counted_saved = True
        for path in Path(self.tune_dir).glob(f"*/{EXPR_RESULT_FILE}"):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    result = json.loads(line)
                except ValueError:
                    continue  # the line a killed driver left half-written
                if isinstance(result, dict) and "trial_id" in result:
                    self._count(str(result["trial_id"]), result.get(TIME_ATTR))

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        self._count_saved()
        self._count(trial_id, result.get(TIME_ATTR))
        return False  # a trial is never stopped for itself; stop_all ends the sweep

    @property
    def spent(self) -> int:
        return sum(self.epochs.values())

    def stop_all(self) -> bool:
        self._count_saved()
        return budget_spent(list(self.epochs.values()), self.budget)


def budget_spent(epochs_by_trial: list[int], budget: int | None) -> bool:
    """True when a sweep with ``tune.budget_epochs = budget`` ended because it was spent."""
    return budget is not None and sum(epochs_by_trial) >= budget
