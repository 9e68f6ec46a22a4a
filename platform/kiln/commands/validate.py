"""kiln validate CONFIG [key=value ...]"""

from __future__ import annotations

from kiln.commands.common import add_config_arguments

HELP = "check a config (keys, types, model arguments) without running anything"


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--print", action="store_true", help="print the resolved config as YAML")


def run(args) -> int:
    from kiln.schema import load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.tune is not None:  # searched keys and values need the whole config to check
        from kiln.tune.sweep import check_sweep

        check_sweep(cfg)
    if args.print:
        print(cfg.to_yaml(), end="")
    else:
        print(f"{args.config}: ok")
    return 0
