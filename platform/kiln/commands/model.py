"""kiln model card MODEL_URI [--out FILE] [--tracking-uri URI] [--run-dir DIR]"""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.commands.common import add_json_argument, emit_json, say

HELP = "registry versions: print or write a version's model card (Markdown)"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    card = sub.add_parser(
        "card",
        help="the model card of a registry version: data, lineage, metrics, and for a "
        "compressed variant its parent, steps, size and accuracy against the reference",
    )
    card.add_argument("uri", metavar="MODEL_URI", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    card.add_argument("--out", metavar="FILE", help="write the card here instead of printing it")
    card.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI of the registry (default: MLFLOW_TRACKING_URI, else "
        "RUN_DIR/mlflow.db)",
    )
    card.add_argument("--run-dir", default="runs", help="default store's run dir (default 'runs')")
    card.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    add_json_argument(card)
    card.set_defaults(_model_run=_card)


def _card(args) -> int:
    from kiln import tracking as trk
    from kiln.errors import ConfigError
    from kiln.files import atomic_write_text
    from kiln.models.card import model_card

    if not args.uri.startswith("models:/"):
        raise ConfigError(f"'{args.uri}' is not a models:/NAME/VERSION or models:/NAME@ALIAS URI")
    tracking_uri = trk.resolve_tracking_uri(args.tracking_uri, args.run_dir)
    text = model_card(tracking_uri, args.uri)
    if args.out:
        atomic_write_text(Path(args.out), text)
        say(args, f"model card of {args.uri}: {args.out}")
    else:
        say(args, text.rstrip("\n"))
    if args.json:
        emit_json({"uri": args.uri, "card": text, "path": args.out})
    return 0


def run(args: argparse.Namespace) -> int:
    return args._model_run(args)
