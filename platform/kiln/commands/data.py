"""kiln data export SOURCE OUT.parquet"""

from __future__ import annotations

HELP = "data tools: write a built-in data set as Parquet (the layout Kiln reads)"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    export = sub.add_parser("export", help="write a built-in source (digits, mnist) to a Parquet file")
    export.add_argument("source", choices=["digits", "mnist"])
    export.add_argument("output", help="Parquet file to write")
    export.set_defaults(_data_run=_export)


def _export(args) -> int:
    from kiln.data.builtin import load_builtin
    from kiln.data.parquet import write_table

    table = load_builtin(args.source)
    path = write_table(table, args.output)
    print(f"wrote {table.num_rows} rows to {path} (columns: image {{bytes, path}} PNG, label int64)")
    return 0


def run(args) -> int:
    return args._data_run(args)
