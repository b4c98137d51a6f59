"""The ``recast`` command line: one entry point, one module per group of subcommands.

Each module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
subcommands and sets ``func`` (called with the parsed arguments, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from recast.errors import RecastError
from recast.version import __version__

COMMAND_MODULES = (
    "recast.cli.demo",
    "recast.cli.mimic",
    "recast.cli.data",
    "recast.cli.train",
    "recast.cli.verify",
    "recast.cli.bench",
    "recast.cli.edge",
    "recast.cli.serve",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="recast",
        description="RECAST: rewrite a pretrained vision model as shared template banks plus a few "
        "coefficients per task, then learn tasks one after another without forgetting.",
    )
    parser.add_argument("--version", action="version", version=f"recast {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; errors the user caused print one clear line and exit with 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except RecastError as exc:
        print(f"recast: error: {exc}", file=sys.stderr)
        if os.environ.get("RECAST_DEBUG"):
            raise
        return 2
    except KeyboardInterrupt:
        print("recast: interrupted", file=sys.stderr)
        return 130
