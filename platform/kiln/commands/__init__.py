"""One module per ``kiln`` subcommand: HELP, add_arguments(parser), run(args) -> exit code.

Only argparse is imported at module level so that ``kiln --help`` stays fast.
"""
