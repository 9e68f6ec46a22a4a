"""kiln data export SOURCE OUT.parquet | kiln data profile CONFIG|PARQUET"""

from __future__ import annotations

HELP = (
    "data tools: export a built-in data set as Parquet, profile a data set (balance, "
    "statistics, leakage)"
)


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    export = sub.add_parser(
        "export", help="write a built-in source (digits, mnist) to a Parquet file"
    )
    export.add_argument("source", choices=["digits", "mnist"])
    export.add_argument("output", help="Parquet file to write")
    export.set_defaults(_data_run=_export)
    profile = sub.add_parser(
        "profile", help="profile a data set under its split: HTML + PNG + JSON"
    )
    profile.add_argument(
        "target",
        metavar="CONFIG|PARQUET",
        help="a Kiln config (its data section) or a Parquet file/folder",
    )
    profile.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.split.seed=1"
    )
    profile.add_argument("--label", help="label column (with a Parquet path; default 'label')")
    profile.add_argument("--image", help="image column (with a Parquet path; default: tabular)")
    profile.add_argument("--out", help="output folder (default runs/profiles/<dataset hash>)")
    profile.add_argument("--json", action="store_true", help="print the profile as one JSON line")
    profile.add_argument(
        "--address",
        help="Ray cluster address whose Ray Data tasks read the data (default: RAY_ADDRESS, else "
        "a local instance)",
    )
    profile.set_defaults(_data_run=_profile)


def _export(args) -> int:
    from kiln.data.builtin import load_builtin
    from kiln.data.parquet import write_table

    table = load_builtin(args.source)
    path = write_table(table, args.output)
    print(
        f"wrote {table.num_rows} rows to {path} (columns: image {{bytes, path}} PNG, label int64)"
    )
    return 0


def _profile(args) -> int:
    from pathlib import Path

    from kiln.commands.common import emit_json, say
    from kiln.data.dataset import check_source, prepare_data
    from kiln.data.profile_report import write_report
    from kiln.errors import KilnError
    from kiln.schema import load_config

    target = Path(args.target)
    if target.suffix in (".yaml", ".yml"):
        cfg = load_config(target, args.overrides)
    else:
        overrides = [f"data.source={args.target}", f"data.label={args.label or 'label'}"]
        if args.image:
            overrides.append(f"data.image={args.image}")
        cfg = load_config(None, overrides + args.overrides)
    from kiln.ray_connection import ensure_ray

    check_source(cfg.data)
    ensure_ray(args.address)
    data = prepare_data(cfg.data)
    profile = data.profile
    if profile is None:  # prepare_data always profiles; PreparedData allows none for tests
        raise KilnError("the data set was prepared without a profile")
    out = Path(args.out or Path(cfg.experiment.run_dir) / "profiles" / profile.dataset_hash)
    paths = write_report(profile, out)
    rows = profile.rows
    say(
        args,
        f"{profile.source}: {rows['total']} rows (train {rows['train']}, val {rows['val']}, test "
        f"{rows['test']}), "
        f"{len(profile.labels)} classes, imbalance ratio {profile.imbalance_ratio:.2f}",
    )
    leak = profile.leakage
    if profile.has_leak:
        say(
            args,
            f"LEAK: identical inputs across splits: train/val {leak['train_val']}, train/test "
            f"{leak['train_test']}, val/test {leak['val_test']}",
        )
    else:
        say(args, "no identical inputs shared between splits")
    say(args, f"report: {paths['html']}")
    if args.json:
        emit_json({**profile.to_dict(), "report": str(paths["html"])})
    return 0


def run(args) -> int:
    return args._data_run(args)
