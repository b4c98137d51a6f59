"""``recast demo``: the embedded default run, end to end, on this machine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    parser = subparsers.add_parser(
        "demo",
        help="run a short end-to-end example on this CPU",
        description="Mimic a small timm ViT with RECAST-Att (exact SVD fit), learn two synthetic tasks "
        "with only their coefficients and heads, check the first task is not forgotten, and save "
        "the model directory.",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="model directory to write (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per task (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the quickstart and print what it measured."""
    from recast.quickstart import run_quickstart
    from recast.recipe import create_timm

    base = create_timm(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3, num_classes=10
    )
    summary = run_quickstart(base, args.out, steps=args.steps)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"mimicry: {summary['mimicry']['method']} in {summary['mimicry']['seconds']:.2f}s, "
          f"weight relative error {summary['mimicry']['weight_rel_error']:.1e}")
    for name in ("quadrants", "corners"):
        task = summary[name]
        print(f"task {name:10s} train accuracy {task['accuracy']:.3f}  per-task params {task['params']}  "
              f"file {summary['bytes'][name + '.safetensors']} bytes")
    print(f"first task's logits unchanged after the second task trained: {summary['first_task_unchanged']}")
    print(f"model directory: {args.out} ({summary['seconds']:.1f}s in all)")
    return 0
