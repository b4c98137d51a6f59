"""``recast data list|build``, ``recast models list`` and ``recast pretrain``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from recast.backbones import list_backbones
from recast.data import list_builtin
from recast.data.builtin import ensure_built, registry
from recast.pretrain import PretrainConfig, pretrain


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the data, models and pretrain subcommands."""
    _register_data(subparsers)
    _register_models(subparsers)
    _register_pretrain(subparsers)


def _group(subparsers: argparse._SubParsersAction, name: str, help: str, description: str,
           list_help: str, list_description: str, list_func: Any) -> argparse._SubParsersAction:
    """A command group ``NAME ACTION`` with its ``list [--json]`` action; returns the actions."""
    group = subparsers.add_parser(name, help=help, description=description)
    actions = group.add_subparsers(dest=f"{name}_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help=list_help, description=list_description)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=list_func)
    return actions


def _register_data(subparsers: argparse._SubParsersAction) -> None:
    actions = _group(subparsers, "data", "the built-in offline datasets",
                     "List or build the built-in datasets (cached under $RECAST_DATA, default "
                     "~/.cache/recast/data). Use any of them as --data builtin:NAME.",
                     "name, classes, images per split, source, licence",
                     "List the built-in datasets; counts show once a dataset is built.", _data_list)
    build = actions.add_parser("build", help="build built-in datasets into the cache now",
                               description="Build the named built-in datasets (all when none is named). Each "
                               "build is deterministic and written atomically; a missing source package is "
                               "named with the command that installs it.")
    build.add_argument("names", nargs="*", metavar="NAME", help="datasets to build (default: all)")
    build.add_argument("--rebuild", action="store_true", help="rebuild even when already in the cache")
    build.set_defaults(func=_data_build)


def _register_models(subparsers: argparse._SubParsersAction) -> None:
    _group(subparsers, "models", "the backbones recast knows and ships",
           "List the backbones: shipped ones (with size and sha256), effnet-lite0, and the timm/torchvision "
           "spec forms.", "name, spec, bytes, sha256",
           "List the backbones recast can load with --model SPEC.", _models_list)


def _register_pretrain(subparsers: argparse._SubParsersAction) -> None:
    defaults = PretrainConfig(backbone="")
    parser = subparsers.add_parser(
        "pretrain", help="pretrain a shipped backbone from scratch on offline data",
        description="Full supervised pretraining of one of the small backbones recast ships (recast-vit32, "
        "recast-resnet32), seeded, on data disjoint from every benchmark task (builtin:glyphs). Writes "
        "NAME.safetensors (fp16) and NAME.json (sha256, seed, data, epochs, accuracy, the command) into --out.")
    parser.add_argument("backbone", help="shipped backbone to pretrain (see: recast models list)")
    parser.add_argument("--data", default=defaults.data, help="data spec (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the weights and manifest into")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="default: %(default)s")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak AdamW learning rate (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="default: %(default)s")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="CPU threads (default: %(default)s)")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help="data loader processes for decoding and augmentation (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.set_defaults(func=_pretrain)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table of ``rows``; ``None`` shows as ``-``."""
    cells = [[("-" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _data_list(args: argparse.Namespace) -> int:
    rows = list_builtin()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        images = row["images"]
        row["train/test"] = f"{images['train']}/{images['test']}" if images else "not built"
    print(_table(rows, ["name", "classes", "train/test", "role", "source", "licence"]))
    return 0


def _data_build(args: argparse.Namespace) -> int:
    for name in args.names or list(registry()):
        meta = ensure_built(name, rebuild=args.rebuild)
        print(f"{name}: {len(meta['classes'])} classes, {meta['images']['train']} train / "
              f"{meta['images']['test']} test images, sha256 {meta['sha256'][:12]}")
    return 0


def _models_list(args: argparse.Namespace) -> int:
    rows = list_backbones()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        row["sha256"] = row["sha256"][:16] if row.get("sha256") else None
    print(_table(rows, ["name", "spec", "bytes", "sha256", "description"]))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    config = PretrainConfig(backbone=args.backbone, data=args.data, epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, threads=args.threads,
                            device=args.device, workers=args.workers)
    manifest = pretrain(config, args.out)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        result = manifest["pretraining"]
        print(f"{manifest['name']}: test accuracy {result['test_accuracy']:.4f} after {config.epochs} epochs "
              f"({result['seconds']:.0f} s); {manifest['bytes']} bytes, sha256 {manifest['sha256']}")
    return 0
