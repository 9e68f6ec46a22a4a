"""Files a sweep leaves in its folder: train configs of the best trials, plots, the results
table."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml

from kiln.errors import first_line
from kiln.tune.config import Objective
from kiln.tune.progress import format_value
from kiln.tune.results import COMPLETED, STOPPED_EARLY, TrialSummary
from kiln.tune.space import Dimension, apply_params


def write_train_config(
    base_config: dict[str, Any], trial: TrialSummary, path: Path, header: str
) -> Path:
    """A complete train config (no ``tune:`` section) that trains ``trial``'s values: ``kiln train
    PATH``."""
    data = apply_params(base_config, trial.params)
    data.pop("tune", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comment + yaml.safe_dump(data, sort_keys=False))
    return path


def results_table(
    trials: list[TrialSummary],
    dims: list[Dimension],
    objectives: list[Objective],
    marks: dict[int, str] | None = None,
) -> str:
    """A plain aligned table: one row per trial, best first on the first objective."""
    from kiln.tune.results import sort_by_objective

    marks = marks or {}
    metric_cols = [o.metric for o in objectives]
    extra = [m for m in ("val_accuracy", "val_loss") if m not in metric_cols]
    columns = ["trial", *[d.key for d in dims], *metric_cols, *extra, "epochs", "status"]
    rows = []
    for t in sort_by_objective(trials, objectives[0]):
        row = [f"{t.number}{marks.get(t.number, '')}"]
        row += [format_value(t.params[d.key]) if d.key in t.params else "-" for d in dims]
        row += [
            format_value(t.metrics[m]) if m in t.metrics else "-" for m in (*metric_cols, *extra)
        ]
        row += [str(t.epochs), t.status.replace("_", " ")]
        rows.append(row)
    widths = [
        max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def optuna_study(trials: list[TrialSummary], dims: list[Dimension], objectives: list[Objective]):
    """An in-memory Optuna study holding the sweep's trials (what Optuna's plots draw).

    Trials that trained every epoch are COMPLETE; trials ASHA stopped are PRUNED, with their
    per-epoch values of the first objective as intermediate values.
    """
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions: list[Literal["maximize", "minimize"]] = [
        "maximize" if o.mode == "max" else "minimize" for o in objectives
    ]
    study = optuna.create_study(directions=directions)
    distributions = {d.key: d.distribution() for d in dims}
    primary = objectives[0].metric
    for t in sorted(trials, key=lambda t: t.number):
        if set(t.encoded_params) != set(distributions):
            continue
        intermediate = {
            int(h["epochs_done"]): h[primary]
            for h in t.history
            if primary in h and math.isfinite(h[primary])
        }
        values = t.values(objectives)
        if t.status == COMPLETED and values is not None:
            state, vals = TrialState.COMPLETE, values
        elif t.status == STOPPED_EARLY:
            state, vals = TrialState.PRUNED, None
        else:
            continue
        study.add_trial(
            create_trial(
                state=state,
                values=vals,
                params=t.encoded_params,
                distributions=distributions,
                intermediate_values=intermediate,
                user_attrs={"kiln_trial": t.number},
            )
        )
    return study


def write_plots(
    trials: list[TrialSummary], dims: list[Dimension], objectives: list[Objective], out_dir: Path
) -> tuple[list[Path], list[str]]:
    """Optimization history, parallel coordinates, parameter importances (and the Pareto front for
    several objectives) as PNG. Returns (written files, notes on plots that could not be drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    study = optuna_study(trials, dims, objectives)
    out_dir.mkdir(parents=True, exist_ok=True)
    multi = len(objectives) > 1
    primary = objectives[0].metric
    target = (lambda t: t.values[0]) if multi else None
    plots = {
        "optimization_history": lambda: ovm.plot_optimization_history(
            study, target=target, target_name=primary
        ),
        "parallel_coordinate": lambda: ovm.plot_parallel_coordinate(
            study, target=target, target_name=primary
        ),
        "param_importances": lambda: ovm.plot_param_importances(
            study, target=target, target_name=primary
        ),
    }
    if multi and len(objectives) <= 3:
        plots["pareto_front"] = lambda: ovm.plot_pareto_front(
            study, target_names=[o.metric for o in objectives]
        )
    written, notes = [], []
    for name, draw in plots.items():
        path = out_dir / f"{name}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax: Any = draw()  # an Axes, or an array of them
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
            fig.tight_layout()
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
        except Exception as exc:  # e.g. importances need two finished trials that differ
            plt.close("all")
            notes.append(f"{name}: not drawn ({first_line(exc, limit=120)})")
    return written, notes
