"""``recast demo``: the embedded default run, end to end, on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    parser = subparsers.add_parser(
        "demo",
        help="run the end-to-end demo on this CPU (about 5 minutes on 2 cores)",
        description="Mimic the shipped 32-px ViT, learn four offline tasks one after another with RECAST "
        "(coefficients + head per task), linear probing and LoRA r=8 (PEFT), print the results table "
        "(accuracy, parameters and bytes per task), save plots and show a few predictions. Finished runs "
        "in --out are kept; --restart reruns them.",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: %(default)s)")
    parser.add_argument("--train-images", type=int, default=3000, help="training images per task (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per task (default: %(default)s)")
    parser.add_argument("--restart", action="store_true", help="rerun runs already in --out")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    from recast.demo import demo_suite, run_demo

    run_demo(args.out, demo_suite(args.train_images, args.epochs), restart=args.restart)
    return 0
