"""The search algorithm of a sweep: Optuna's sampler (TPE or random) inside Ray Tune's OptunaSearch.

One function builds it for ``kiln tune`` and for ``bench/tune_efficiency.py``, so the benchmark
measures the searcher users get.
"""

from __future__ import annotations

from typing import Any

from kiln.tune.config import TuneConfig
from kiln.tune.space import Dimension, optuna_space


def make_sampler(t: TuneConfig, max_concurrent: int | None, **tpe_options: Any):
    """Optuna's sampler for ``tune.searcher``, seeded with ``tune.seed``.

    ``tpe_options`` override TPESampler's arguments (the benchmark's candidate settings).
    """
    import optuna

    if t.searcher != "tpe":
        return optuna.samplers.RandomSampler(seed=t.seed)
    options: dict[str, Any] = {
        "seed": t.seed,
        "n_startup_trials": t.startup_trials,
        # Trials running in parallel are not all sent to the same promising region.
        "constant_liar": (max_concurrent or 2) > 1,
        **tpe_options,
    }
    return optuna.samplers.TPESampler(**options)


def make_searcher(
    t: TuneConfig, dims: list[Dimension], max_concurrent: int | None, warm=None, **tpe_options
):
    """Ray Tune's OptunaSearch over ``dims`` for ``t.objectives``; seeded with a warm start's
    trials when ``warm`` (a ``kiln.tune.warm_start.WarmStart``) is given."""
    from ray.tune.search.optuna import OptunaSearch

    metrics: list[str] = [o.metric for o in t.objectives]
    modes: list[str] = [o.mode for o in t.objectives]
    seeded: dict[str, Any] = {}
    if warm is not None:
        from kiln.tune.warm_start import STUDY_NAME, seeded_storage

        # OptunaSearch loads the study of that name from the storage: the warm trials included.
        seeded = {"storage": seeded_storage(warm, dims, t.objectives), "study_name": STUDY_NAME}
    return OptunaSearch(
        space=optuna_space(dims),
        metric=metrics if t.multi_objective else metrics[0],
        mode=modes if t.multi_objective else modes[0],
        sampler=make_sampler(t, max_concurrent, **tpe_options),
        **seeded,
    )
