"""kiln compress CONFIG [key=value ...] [--address ADDR] [--json]"""

from __future__ import annotations

from kiln.commands.common import add_config_arguments, add_json_argument, emit_json, say

HELP = (
    "make pruned, quantized and distilled variants of a registered model, evaluate them side "
    "by side, register them"
)


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--address",
        help="Ray cluster address for the training steps (default: RAY_ADDRESS, else local)",
    )
    add_json_argument(parser)


def run(args) -> int:
    from kiln.schema import load_config

    cfg = load_config(args.config, args.overrides)  # refused before torch and Ray are imported

    from kiln.compress.run import run_compression

    steps = ", ".join(s.variant for s in cfg.compress.steps) if cfg.compress else ""
    say(args, f"kiln compress: {cfg.compress.model if cfg.compress else '?'} -> {steps}")
    result = run_compression(
        cfg, address=args.address, say=lambda text: say(args, text), debug=args.debug
    )
    say(args, "")
    say(args, result.table)
    for row in [*result.baselines, *result.variants]:
        for note in row.notes:
            say(args, f"  note {row.name}: {note}")
    say(args, "")
    say(args, f"selection  {result.selection_message}")
    say(args, f"report     {result.report['markdown']}  (+ report.json, pareto.png)")
    say(args, f"run        {result.run_id}  ({result.tracking_uri})")
    if args.json:
        emit_json(result.to_dict())
    return 0
