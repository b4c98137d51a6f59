"""``recast demo``: the embedded default run, end to end, on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path

from recast.demo import DemoSettings, run_demo


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    parser = subparsers.add_parser(
        "demo",
        help="run the end-to-end demo on this CPU (under 10 minutes on 2 cores)",
        description="Mimic EfficientNet-Lite0 (ImageNet weights, offline) at a reduced input size, learn three "
        "built-in tasks one after another with RECAST (76 coefficients + head per task), a linear probe and "
        "LoRA r=8 (PEFT), print the results table (every task's test accuracy, MNIST's included), and write a "
        "picture of RECAST's predictions on test images next to accuracy against bytes per task. Finished runs "
        "in --out are kept; --restart reruns them.",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: %(default)s)")
    parser.add_argument("--train-images", type=int, default=600, help="training images per task (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per task (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=96, help="input size in pixels (default: %(default)s)")
    parser.add_argument("--full", action="store_true", help="add full fine-tuning (about 3 more minutes)")
    parser.add_argument("--restart", action="store_true", help="rerun runs already in --out")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    settings = DemoSettings(args.train_images, args.epochs, args.image_size, args.full)
    run_demo(args.out, settings, restart=args.restart)
    return 0
