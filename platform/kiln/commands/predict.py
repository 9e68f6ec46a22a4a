"""kiln predict MODEL_URI INPUT.parquet OUTPUT.parquet [--address ADDR] [--json]"""

from __future__ import annotations

import time

from kiln.commands.common import add_json_argument, emit_json, say

HELP = (
    "batch inference with Ray Data: predict every row of a Parquet file into another Parquet file"
)


def add_arguments(parser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL_URI",
        help="models:/NAME/VERSION, models:/NAME@ALIAS, a run id or a model folder",
    )
    parser.add_argument(
        "input", metavar="INPUT.parquet", help="Parquet file (or folder) with the model's inputs"
    )
    parser.add_argument(
        "output", metavar="OUTPUT.parquet", help="Parquet file to write, one row per input row"
    )
    parser.add_argument(
        "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)"
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else runs/mlflow.db)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=256, help="rows per model call (default 256)"
    )
    parser.add_argument(
        "--actors", type=int, default=2, help="most model actors in the pool (default 2)"
    )
    parser.add_argument(
        "--cpus-per-actor", type=float, default=0.5, help="CPUs reserved per actor (default 0.5)"
    )
    parser.add_argument(
        "--image-column", help="column with encoded images (default: the only binary column)"
    )
    add_json_argument(parser)


def run(args) -> int:
    from kiln.batch_inference import predict_parquet
    from kiln.errors import ConfigError

    if args.batch_size < 1 or args.actors < 1 or args.cpus_per_actor <= 0:
        raise ConfigError("--batch-size and --actors must be at least 1, --cpus-per-actor above 0")
    started, last = time.monotonic(), [0.0]

    def progress(rows: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or (total and rows >= total):
            last[0] = now
            of = f"/{total}" if total else ""
            say(args, f"predicted {rows}{of} rows ({rows / max(now - started, 1e-9):.0f} rows/s)")

    say(args, f"kiln predict: {args.model} on {args.input}")
    result = predict_parquet(
        args.model,
        args.input,
        args.output,
        tracking_uri=args.tracking_uri,
        batch_size=args.batch_size,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        image_column=args.image_column,
        progress=progress,
        address=args.address,
        debug=args.debug,
    )
    say(args, f"wrote {result.rows} rows to {result.output} in {result.seconds:.1f}s")
    if args.json:
        emit_json(result.to_dict())
    return 0
