"""``recast train``, ``recast eval``, ``recast tasks`` and ``recast predict``.

Parsing and printing only: every step (opening the model directory and the data, training,
sequences, task records) is a call into :mod:`recast.train`; files are written by the main
process only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from recast import train
from recast.cli.options import parse_options
from recast.data.images import load_image
from recast.distributed import DistContext, default_device, init_distributed, shutdown
from recast.errors import ConfigError, FileFormatError
from recast.format import check_task_name
from recast.train import TrainConfig

DEFAULT_SEEDS = (42, 1998, 3142592)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``eval``, ``tasks`` and ``predict`` to the ``recast`` command."""
    _register_train(subparsers)
    _register_eval(subparsers)
    _register_tasks(subparsers)
    _register_predict(subparsers)


# --------------------------------------------------------------------------------- parsers
def _register_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="learn one task (or a sequence of tasks) into a model directory",
        description="Learn task NAME from the data SPEC into model directory DIR: the task's coefficients and "
        "head are trained (AdamW, StepLR, the paper's defaults), the best epoch is chosen on the validation split "
        "and test accuracy is measured once. A checkpoint is written after each epoch; --resume continues an "
        "interrupted run to the same result. With --sequence, tasks are learned one after another and every "
        "earlier task is re-evaluated after each (accuracy matrix, average accuracy, forgetting, backward "
        "transfer), over several seeds. Runs under `torchrun --nproc_per_node N -m recast train ...` too.",
    )
    parser.add_argument("directory", metavar="DIR", help="model directory (created with --model if missing)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", metavar="NAME", help="task to add, or to retrain when it exists")
    what.add_argument("--sequence", metavar="SUITE_OR_FILE",
                      help="'offline' (the built-in tasks of `recast bench`) or a JSON file: "
                      '{"name": SUITE, "tasks": [{"name": ..., "data": SPEC}, ...]}')
    parser.add_argument("--data", metavar="SPEC", help="data spec (with --task): imagefolder:PATH, csv:PATH, "
                        "torchvision:NAME:ROOT or builtin:NAME")
    parser.add_argument("--model", metavar="SPEC", help="create DIR from this backbone first (see `recast models list`)")
    parser.add_argument("--method", metavar="METHOD",
                        help="what each task trains when creating DIR: recast (default), melo, recast+melo, adaptformer, "
                        "recast+adaptformer, clr, recast+clr, piggyback, recast+piggyback, lora, vera, linear, full")
    parser.add_argument("--target", help="layers RECAST rewrites when creating DIR: att, mlp, att+mlp, conv "
                        "(default: att on a ViT, conv on a ResNet)")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="method option when creating DIR, repeatable: groups=3, templates=2, rank=8, alpha=16, "
                        "head_lr=0.01, coef_lr=..., mask_lr=1e-4 ...")
    parser.add_argument("--weights", metavar="FILE", help="local weights for --model timm:NAME")
    parser.add_argument("--config", metavar="FILE", help="JSON or TOML file of training options; flags override it")
    _add_train_options(parser)
    parser.add_argument("--own-bn", action="store_true", help="keep this task's own BatchNorm statistics")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="validation share carved from train when the data has no validation split (0.1)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the carved validation/test splits (0)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: from DIR/checkpoints/NAME (--task), or from the last finished "
                        "task and epoch (--sequence), to the same result")
    parser.add_argument("--log-csv", metavar="FILE", help="write the per-epoch history to this CSV file")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: a GPU when there is one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                        help="comma-separated seeds for --sequence, mean and std over them (42,1998,3142592)")
    parser.add_argument("--out", metavar="DIR", help="where --sequence writes its result JSON (default DIR/results)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=_cmd_train)


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field; unset flags keep the config file's or the default value."""
    defaults = TrainConfig()
    group = parser.add_argument_group("training options (defaults: the paper's)")
    group.add_argument("--epochs", type=int, help=f"passes over the training data ({defaults.epochs})")
    group.add_argument("--batch-size", type=int, help=f"global batch size ({defaults.batch_size})")
    group.add_argument("--lr", type=float, help=f"AdamW learning rate ({defaults.lr})")
    group.add_argument("--weight-decay", type=float, help=f"AdamW weight decay ({defaults.weight_decay})")
    group.add_argument("--step-size", type=int, help=f"StepLR period in epochs ({defaults.step_size})")
    group.add_argument("--gamma", type=float, help=f"StepLR factor ({defaults.gamma})")
    group.add_argument("--grad-clip", type=float, help=f"gradient norm clip, 0 disables ({defaults.grad_clip})")
    group.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    group.add_argument("--seed", type=int, help=f"seed of shuffling, augmentation and the new head ({defaults.seed})")
    group.add_argument("--num-workers", type=int, help=f"DataLoader workers ({defaults.num_workers})")
    group.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="autocast precision (fp16: GPU only)")
    group.add_argument("--augment", choices=train.AUGMENTS,
                       help="training augmentation: default (random resized crops and flips), reference (the reference "
                       "release's preset), none (the evaluation transform)")
    group.add_argument("--no-augment", dest="augment", action="store_const", const="none",
                       help="the same as --augment none")
    group.add_argument("--image-size", type=int, metavar="N",
                       help="input side length: the model and the transforms follow (default: the backbone's own); "
                       "recorded in every task and result file")
    group.add_argument("--eval-batch-size", type=int, help="batch size for validation and test")
    group.add_argument("--skip-bad-images", action="store_true", default=None,
                       help="skip image files that do not decode (16-bit, CMYK, palette, EXIF and animated files are "
                       "converted; truncated, corrupt or oversized ones are refused) and count them in the result")
    group.add_argument("--max-pixels", type=int, metavar="N",
                       help="refuse image files with more pixels than this before decoding (decompression bombs)")


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="accuracy of one task on a data split",
        description="Measure the accuracy of task NAME of model directory DIR on the test (or validation) split "
        "of the data SPEC, which must have the task's classes.",
    )
    parser.add_argument("directory", metavar="DIR")
    parser.add_argument("--task", metavar="NAME", required=True)
    parser.add_argument("--data", metavar="SPEC", required=True)
    parser.add_argument("--split", choices=("test", "val", "train"), default="test")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, metavar="N",
                        help="input side length (default: the size the task was trained at, as its record states)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=_cmd_eval)


def _register_tasks(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tasks", help="list the tasks of a model directory",
        description="List the tasks stored in model directory DIR: classes, stored numbers by kind "
        "(coefficients, head, other), bytes on disk and the recorded accuracies.",
    )
    parser.add_argument("directory", metavar="DIR")
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    parser.set_defaults(func=_cmd_tasks)


def _register_predict(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="top-k labels of image files for one task",
        description="Classify IMAGE files with task NAME of model directory DIR; prints the top-k class names "
        "and probabilities of each.",
    )
    parser.add_argument("directory", metavar="DIR")
    parser.add_argument("images", metavar="IMAGE", nargs="+")
    parser.add_argument("--task", metavar="NAME", required=True)
    parser.add_argument("--top-k", type=int, default=5, help="how many labels per image")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=_cmd_predict)


# -------------------------------------------------------------------------------- helpers
def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the ``--config`` file, then the flags given on the command line."""
    config = TrainConfig.from_file(args.config) if getattr(args, "config", None) else TrainConfig()
    names = ("epochs", "batch_size", "lr", "weight_decay", "step_size", "gamma", "max_steps", "seed",
             "num_workers", "precision", "augment", "eval_batch_size", "image_size", "skip_bad_images", "max_pixels")
    overrides = {name: getattr(args, name, None) for name in names}
    config = config.updated(**overrides)
    if getattr(args, "grad_clip", None) is not None:  # 0 turns clipping off
        config = dataclasses.replace(config, grad_clip=args.grad_clip if args.grad_clip > 0 else None)
    return config


def _parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds lists no seed")
    return seeds


# ---------------------------------------------------------------------------------- train
def _cmd_train(args: argparse.Namespace) -> int:
    if args.task is not None:  # refuse a bad name or missing data before anything is written
        check_task_name(args.task)
        if not args.data:
            raise ConfigError("--task needs --data SPEC")
    elif args.sequence:
        train.read_sequence(args.sequence)
    config = train_config_from_args(args)
    dist = init_distributed(args.device)
    try:
        _ensure_directory(args, dist)
        result = _train_sequence(args, config, dist) if args.sequence else _train_one(args, config, dist)
        if dist.is_main:
            _print_result(result, args.json)
    finally:
        shutdown(dist)
    return 0


def _ensure_directory(args: argparse.Namespace, dist: DistContext) -> None:
    """Create the model directory from ``--model`` when it does not exist yet (main process only)."""
    if train.is_model_directory(args.directory):
        return
    if not args.model:
        raise FileFormatError(f"{args.directory}: not a recast model directory; pass --model SPEC --target T to create it")
    options = parse_options(args.opt)
    if args.target:
        options["target"] = args.target
    if dist.is_main:
        train.create_directory(args.directory, args.model, method=args.method, options=options, weights=args.weights)
    dist.barrier()


def _train_one(args: argparse.Namespace, config: TrainConfig, dist: DistContext) -> dict[str, Any]:
    model = train.load_model(args.directory, method=args.method, image_size=config.image_size)
    entry = train.SequenceEntry(args.task, args.data)
    task = train.open_task(entry, model.net, config, val_fraction=args.val_fraction, data_seed=args.data_seed)
    train.prepare_task(model, args.task, task.classes, own_bn=args.own_bn, seed=config.seed)
    checkpoints = Path(args.directory) / "checkpoints" / args.task
    result = train.fit_task(model, task.train, task.val, task.test, config, checkpoint_dir=checkpoints,
                            resume=args.resume, dist=dist, progress=not args.no_progress, log_csv=args.log_csv)
    meta = train.task_meta(model, task, result, config.seed)
    record: dict[str, Any] = {"task": args.task, **meta}
    if dist.is_main:
        model.to("cpu")
        record = model.save_task(args.directory, args.task, meta=meta)
        train.remove_checkpoint(checkpoints)
    return {k: record[k] for k in ("task", "metrics", "params", "bytes", "train_seconds") if k in record}


def _train_sequence(args: argparse.Namespace, config: TrainConfig, dist: DistContext) -> dict[str, Any]:
    suite, entries = train.read_sequence(args.sequence)
    directory = Path(args.directory)
    run = train.SequenceRun(
        directory=directory, suite=suite, entries=tuple(entries), seeds=_parse_seeds(args.seeds),
        out=Path(args.out) if args.out else directory / "results", backbone=args.model, method=args.method,
        own_bn=args.own_bn, val_fraction=args.val_fraction, data_seed=args.data_seed, progress=not args.no_progress,
        resume=args.resume,
    )
    return train.run_sequence(run, config, dist)


def _print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    if "metrics" in result:
        m = result["metrics"]
        test = "n/a" if m.get("test_accuracy") is None else f"{m['test_accuracy']:.4f}"
        print(f"task {result['task']}: test accuracy {test}, validation accuracy {m['val_accuracy']:.4f} "
              f"(best epoch {m['best_epoch']}), params {result.get('params')}, {result.get('bytes')} bytes")
        return
    summary = result.get("summary", {})
    for key in ("average_accuracy", "forgetting", "bwt"):
        if key in summary:
            print(f"{key}: {summary[key]['mean']:.4f} ± {summary[key]['std']:.4f}")
    for path in result.get("files", []):
        print(f"wrote {path}")


# ----------------------------------------------------------------------------------- eval
def _load_for_task(directory: str, task: str, image_size: int | None) -> Any:
    """The model of ``directory`` with ``task`` active, at ``image_size`` or the size the task was trained at."""
    model = train.load_model(directory)
    model.require_task(task)
    train.set_image_size(model.net, image_size or train.recorded_image_size(model, task))
    model.set_task(task)
    return model


def _cmd_eval(args: argparse.Namespace) -> int:
    model = _load_for_task(args.directory, args.task, args.image_size)
    augment = train.recorded_augment(model, args.task)  # evaluation as the task was trained (statistics, resize)
    config = TrainConfig(augment=augment, image_size=train.image_size_of(model.net))
    task = train.open_task(train.SequenceEntry(args.task, args.data), model.net, config,
                           val_fraction=args.val_fraction, data_seed=args.data_seed)
    train.check_classes(model, args.task, task.classes)
    dataset = getattr(task, args.split)
    device = args.device or default_device()
    model.to(device)
    accuracy = train.evaluate(model, dataset, batch_size=args.batch_size, device=device)
    result = {"task": args.task, "split": args.split, "accuracy": accuracy, "samples": len(dataset), "data": args.data,
              "image_size": config.image_size, "augment": augment}
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(f"task {args.task}: {args.split} accuracy {accuracy:.4f} on {len(dataset)} images "
              f"({config.image_size} px)")
    return 0


# ---------------------------------------------------------------------------------- tasks
def _cmd_tasks(args: argparse.Namespace) -> int:
    rows = train.task_records(args.directory)
    backbone_bytes = train.backbone_bytes(args.directory)
    if args.json:
        print(json.dumps({"backbone_bytes": backbone_bytes, "tasks": rows}, indent=2, sort_keys=True))
        return 0
    print(f"{'task':<20} {'classes':>7} {'coefs':>7} {'head':>8} {'other':>6} {'bytes':>9} {'test':>7} {'val':>7}")
    for row in rows:
        p = row["params"]
        print(f"{row['task']:<20} {row['num_classes']!s:>7} {p.get('coefficients', 0):>7} {p.get('head', 0):>8} "
              f"{p.get('other', 0):>6} {row['bytes']!s:>9} {_fmt(row['test_accuracy']):>7} {_fmt(row['val_accuracy']):>7}")
    print(f"backbone: {backbone_bytes} bytes; {len(rows)} tasks")
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# -------------------------------------------------------------------------------- predict
def _cmd_predict(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    model = _load_for_task(args.directory, args.task, None)
    model.eval()
    record = model.tasks[args.task].meta or {}
    transform = train.eval_transform(model.net, train.recorded_augment(model, args.task), record.get("data"))
    images = torch.stack([transform(load_image(Path(p))) for p in args.images])
    with torch.no_grad():
        probs = model(images).softmax(-1)
    names = model.tasks[args.task].class_names or [str(i) for i in range(probs.shape[-1])]
    k = min(args.top_k, probs.shape[-1])
    values, indices = probs.topk(k, dim=-1)
    results = [
        {"image": path, "top": [{"label": names[int(i)], "index": int(i), "probability": float(v)}
                                for v, i in zip(vals, idx, strict=True)]}
        for path, vals, idx in zip(args.images, values, indices, strict=True)
    ]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for item in results:
            print(f"{item['image']}: " + ", ".join(f"{t['label']} ({t['probability']:.3f})" for t in item["top"]))
    return 0
