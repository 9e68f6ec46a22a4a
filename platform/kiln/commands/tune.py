"""kiln tune CONFIG [key=value ...] [--resume] [--warm-start SWEEP_DIR_OR_RUN] [--address ADDR]
[--json]"""

from __future__ import annotations

import sys

from kiln.commands.common import add_config_arguments, add_json_argument, emit_json, say

HELP = "tune hyperparameters with Ray Tune (Optuna TPE + ASHA) over a train config's keys"


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the latest sweep of this config: an unfinished one (finished trials are "
        "not re-run), or a finished one given a larger tune.num_samples (only the new trials run)",
    )
    parser.add_argument(
        "--warm-start",
        metavar="SWEEP_DIR_OR_RUN",
        help="seed the searcher with a finished sweep's trials (its folder or MLflow run id); "
        "trials outside this space are skipped and reported",
    )
    add_json_argument(parser)


def _header(cfg) -> str:
    t = cfg.require_tune()
    search = "TPE" if t.searcher == "tpe" else "random search"
    stopping = (
        f", ASHA (grace {t.asha.grace_period}, reduction {t.asha.reduction_factor:g})"
        if t.asha is not None
        else ", no early stopping"
    )
    objectives = ", ".join(
        f"{'max' if o.mode == 'max' else 'min'} {o.metric}" for o in t.objectives
    )
    kind = "Ray Train workers" if t.gpus_per_worker else "ranks (DDP)"
    workers = f"{t.trial_workers} {kind}" if t.trial_workers > 1 else "1 worker"
    return (
        f"kiln tune: {t.num_samples} trials of {cfg.model.name} on {cfg.data.source} over "
        f"{', '.join(t.space)}; {search}{stopping}; {objectives}; {workers} x "
        f"{t.cpus_per_worker:g} CPU per trial"
    )


def run(args) -> int:
    from kiln.schema import load_config
    from kiln.tune.sweep import SweepInterrupted, check_sweep, run_sweep

    # The config first: a mistake in it is refused before Ray is imported (0.5 s, not 2.5 s).
    cfg = load_config(args.config, args.overrides)
    check_sweep(cfg)

    from kiln.tune.outputs import results_table
    from kiln.tune.progress import format_params, format_value
    from kiln.tune.space import parse_space

    say(args, _header(cfg))
    try:
        result = run_sweep(
            cfg,
            address=args.address,
            resume=args.resume,
            progress=lambda line: say(args, line),
            debug=args.debug,
            warm_start=args.warm_start,
        )
    except SweepInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return 130
    t = cfg.require_tune()
    dims = parse_space(t.space)
    marks = {m.number: " p" for m in result.front}
    if result.best is not None:
        marks[result.best.number] = " *"
    say(args, "")
    say(args, results_table(result.trials, dims, t.objectives, marks))
    say(args, "")
    legend = "* best" + (", p Pareto front" if t.multi_objective else "")
    say(
        args,
        f"{len(result.trials)} trials, {result.stopped_early} stopped early by ASHA   ({legend})",
    )
    best = result.best
    if best is None:
        say(args, "no trial produced the objective values; see the results above")
    else:
        values = "  ".join(
            f"{o.metric} {format_value(best.metrics[o.metric])}" for o in t.objectives
        )
        say(args, f"best     trial {best.number}: {values}  ({format_params(best.params)})")
        if result.test_metrics:
            say(
                args,
                f"test     accuracy {result.test_metrics['test_accuracy']:.4f}   "
                f"macro-F1 {result.test_metrics['test_f1_macro']:.4f}  (best trial's model)",
            )
        if t.multi_objective:
            members = ", ".join(str(m.number) for m in result.front)
            say(
                args,
                f"front    {len(result.front)} trials: {members} (configs in "
                f"{result.sweep_dir}/front/)",
            )
        say(args, f"model    {result.model_uri}")
        say(args, f"config   {result.best_config_path}   (kiln train {result.best_config_path})")
    say(args, f"sweep    {result.sweep_dir}")
    say(args, f"run      {result.run_id}  ({result.tracking_uri})")
    for note in result.notes:
        say(args, f"note     {note}")
    if args.json:
        emit_json(result.to_dict())
    return 0
