"""The Ray Tune section of kiln.compat against the installed Ray: growing a saved sweep's size must
still reach the count a restored search algorithm creates trials up to."""

from __future__ import annotations

import pytest


def test_growing_a_saved_search_state_raises_the_count_a_restore_creates_trials_up_to(tmp_path):
    import optuna
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.search_generator import SearchGenerator

    from kiln import compat

    def generator() -> SearchGenerator:
        space = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
        return SearchGenerator(OptunaSearch(space=space, metric="m", mode="max"))

    saved = generator()
    saved.set_state({"counter": 4, "total_samples": 4, "finished": False, "experiment": None})
    assert saved.is_finished()
    saved.save_to_dir(str(tmp_path), session_str="2026-11-27_00-00-00")
    assert compat.grow_saved_sweep(str(tmp_path), 6) == 4
    restored = generator()
    restored.restore_from_dir(str(tmp_path))
    assert restored.total_samples == 6 and not restored.is_finished()
    with pytest.raises(FileNotFoundError, match="no saved Ray Tune search state"):
        compat.grow_saved_sweep(str(tmp_path / "empty"), 6)
