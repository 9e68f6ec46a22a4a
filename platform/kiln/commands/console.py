"""kiln console [--print] [--run-dir DIR] [--address ADDR] [--url URL] [--json]"""

from __future__ import annotations

import argparse
import os
import sys

from kiln.commands.common import add_json_argument, emit_json, say

HELP = "open the Kiln console (a live page of the served models) in a browser, or print its URL"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--print",
        dest="print_only",
        action="store_true",
        help="print the URL only (the default on a machine with no graphical browser)",
    )
    parser.add_argument(
        "--run-dir", default="runs", help="where the serving state is kept (default 'runs')"
    )
    parser.add_argument(
        "--address", help="Ray cluster that serves (default: RAY_ADDRESS, else RUN_DIR's record)"
    )
    parser.add_argument("--url", help="serving URL (default: the one `kiln serve start` recorded)")
    add_json_argument(parser)


def has_display() -> bool:
    """Whether a graphical browser can open here (macOS, Windows, or an X/Wayland session): a
    terminal browser would take over the user's terminal, so it is never used."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def console_url(run_dir: str, address: str | None, url: str | None, debug: bool = False) -> str:
    """The console's URL: the one ``kiln serve start`` recorded, else ``/console/`` of the serving
    URL. Raises KilnError when nothing is served."""
    from kiln.monitor.console.client import serving_url
    from kiln.serve.instance import load_state

    if not url:
        state = load_state(run_dir)
        if state is not None and state.console_url and address in (None, state.address):
            return state.console_url
    if not url:
        from kiln.commands.serve import use_serving_env

        use_serving_env(run_dir, address)
    return serving_url(run_dir, address, url, debug) + "/console/"


def run(args: argparse.Namespace) -> int:
    url = console_url(args.run_dir, args.address, args.url, args.debug)
    opened = False
    if not args.print_only and has_display():
        import webbrowser

        opened = webbrowser.open(url)
    say(args, f"{'opened' if opened else 'console'}  {url}")
    if args.json:
        emit_json({"url": url, "opened": opened})
    return 0
