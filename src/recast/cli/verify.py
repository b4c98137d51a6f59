"""``recast verify DIR``: check every file of a model directory and say what is wrong."""

from __future__ import annotations

import argparse
import json
import sys

from recast.format import check_model_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``verify`` subcommand."""
    parser = subparsers.add_parser(
        "verify", help="check every file of a model directory",
        description="Check a model directory file by file: the config parses; the backbone and each task "
        "file have the sha256 the config pins and metadata of this format, version and bank fingerprint; "
        "no leftovers of an interrupted write; no writer holds the lock. Exits 1 when a file is bad "
        "(warnings alone exit 0).",
    )
    parser.add_argument("directory", metavar="DIR", help="the model directory (written by recast mimic or train)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    """Print the per-file report; 1 when any file is bad, else 0."""
    findings = check_model_dir(args.directory)
    errors = [f for f in findings if f.status == "error"]
    if args.json:
        summary = {"directory": args.directory, "ok": not errors, "files": [f.to_dict() for f in findings]}
        print(json.dumps(summary, indent=2))
    else:
        for finding in findings:
            print(f"{finding.status.upper():8} {finding.path}: {finding.message}")
        verdict = f"{len(errors)} bad file(s)" if errors else "all files good"
        print(f"{args.directory}: {verdict}", file=sys.stderr if errors else sys.stdout)
    return 1 if errors else 0
