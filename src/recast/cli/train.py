"""``recast train``, ``recast eval``, ``recast tasks`` and ``recast predict``.

Thin wrappers over :mod:`recast.train`: parse the options, open the model directory and the data,
call the library, print a short report (or JSON), write files from the main process only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from recast.cli.options import parse_options
from recast.errors import ConfigError, FileFormatError, TaskError
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
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoints/NAME")
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
    group.add_argument("--no-augment", dest="augment", action="store_const", const=False,
                       help="train on the evaluation transform (no random crops or flips)")
    group.add_argument("--eval-batch-size", type=int, help="batch size for validation and test")


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
             "num_workers", "precision", "augment", "eval_batch_size")
    overrides = {name: getattr(args, name, None) for name in names}
    config = config.updated(**overrides)
    if getattr(args, "grad_clip", None) is not None:  # 0 turns clipping off
        config = dataclasses.replace(config, grad_clip=args.grad_clip if args.grad_clip > 0 else None)
    return config


def _load_model(directory: str | Path) -> Any:
    from recast.format import CONFIG_FILE
    from recast.methods import load_method

    if not (Path(directory) / CONFIG_FILE).is_file():
        raise FileFormatError(f"{directory}: not a recast model directory (no {CONFIG_FILE}); "
                              "create one with `recast train DIR --model SPEC --target T ...` or `recast mimic`")
    return load_method(directory)


def _check_method(model: Any, args: argparse.Namespace) -> None:
    """An existing directory keeps its method: asking for another one is an error, not a silent switch."""
    current = getattr(model, "method", "recast")
    if args.method and args.method != current:
        raise ConfigError(f"{args.directory} was made for method {current!r}, not {args.method!r}; "
                          "use another directory for another method")


def _require_task(model: Any, name: str) -> None:
    if name not in model.tasks:
        raise TaskError(f"no task named {name!r}; existing tasks: {', '.join(sorted(model.tasks)) or 'none'}")


def _open(spec: str, model: Any, *, augment: bool, val_fraction: float, seed: int) -> Any:
    from recast.data import open_data
    from recast.data.transforms import data_config, transforms_for

    evaluation = transforms_for(model.net, train=False)
    training = transforms_for(model.net, train=True) if augment else evaluation
    return open_data(spec, val_fraction=val_fraction, seed=seed, train_transform=training,
                     eval_transform=evaluation, input_shape=tuple(data_config(model.net)["input_size"]))


# ---------------------------------------------------------------------------------- train
def _cmd_train(args: argparse.Namespace) -> int:
    from recast.distributed import init_distributed, shutdown

    config = train_config_from_args(args)
    dist = init_distributed(args.device)
    try:
        _ensure_directory(args, dist)
        if args.sequence:
            result = _train_sequence(args, config, dist)
        else:
            if not args.data:
                raise ConfigError("--task needs --data SPEC")
            result = _train_one(args, config, dist)
        if dist.is_main:
            _print_result(result, args.json)
    finally:
        shutdown(dist)
    return 0


def _ensure_directory(args: argparse.Namespace, dist: Any) -> None:
    """Create the model directory from ``--model`` when it does not exist yet (main process only)."""
    from recast.format import CONFIG_FILE

    if (Path(args.directory) / CONFIG_FILE).is_file():
        return
    if not args.model:
        raise FileFormatError(f"{args.directory}: not a recast model directory; pass --model SPEC --target T to create it")
    if dist.is_main:
        from recast.backbones import load_backbone
        from recast.methods import build_method

        options = parse_options(args.opt)
        if args.target:
            options["target"] = args.target
        base = load_backbone(args.model, weights=args.weights)
        build_method(args.method or "recast", base, **options).save_pretrained(args.directory)
    dist.barrier()


def _train_one(args: argparse.Namespace, config: TrainConfig, dist: Any) -> dict[str, Any]:
    from recast.train import fit_task, prepare_task, remove_checkpoint

    model = _load_model(args.directory)
    _check_method(model, args)
    splits = _open(args.data, model, augment=config.augment, val_fraction=args.val_fraction, seed=args.data_seed)
    prepare_task(model, args.task, splits.classes, own_bn=args.own_bn, seed=config.seed)
    checkpoints = Path(args.directory) / "checkpoints" / args.task
    result = fit_task(model, splits.train, splits.val, splits.test, config, checkpoint_dir=checkpoints,
                      resume=args.resume, dist=dist, progress=not args.no_progress, log_csv=args.log_csv)
    meta = {"method": getattr(model, "method", "recast"), "seed": config.seed, "data": args.data, "split_info": splits.split_info,
            **result.to_meta()}
    record: dict[str, Any] = {"task": args.task, **meta}
    if dist.is_main:
        model.to("cpu")
        record = model.save_task(args.directory, args.task, meta=meta)
        remove_checkpoint(checkpoints)
    return {k: record[k] for k in ("task", "metrics", "params", "bytes", "train_seconds") if k in record}


def _train_sequence(args: argparse.Namespace, config: TrainConfig, dist: Any) -> dict[str, Any]:
    suite, entries = read_sequence(args.sequence)
    seeds = _parse_seeds(args.seeds)
    out = Path(args.out) if args.out else Path(args.directory) / "results"
    return run_sequence(args, suite, entries, seeds, config, out, dist)


def read_sequence(path: str | Path) -> tuple[str, list[dict[str, str]]]:
    """A suite name (``offline``: the built-in tasks of ``recast bench``), or a sequence file:
    ``{"name": SUITE, "tasks": [{"name": ..., "data": SPEC}, ...]}`` or just the list."""
    from recast.bench import offline_suite
    from recast.io import read_json

    if str(path) == "offline":
        return "offline", [{"name": t.name, "data": t.data} for t in offline_suite().tasks]
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--sequence {path}: no such file or suite; use 'offline' (the built-in tasks) or a JSON "
                          'file listing the tasks ({"name": "my-suite", "tasks": [{"name": "t1", "data": "imagefolder:..."}, ...]})')
    data = read_json(path)
    suite, entries = (data.get("name", path.stem), data.get("tasks")) if isinstance(data, dict) else (path.stem, data)
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: lists no tasks; expected a list of {{\"name\": ..., \"data\": SPEC}}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("data"), str):
            raise ConfigError(f"{path}: task {i} needs a string 'name' and a string 'data' spec, got {entry!r}")
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: task names repeat: {names}")
    return str(suite), entries


def run_sequence(
    args: argparse.Namespace, suite: str, entries: list[dict[str, str]], seeds: list[int], config: TrainConfig,
    out: Path, dist: Any,
) -> dict[str, Any]:
    """Learn the sequence once per seed; write one result JSON per seed and a summary (main process only).

    The task files of the first seed are saved into the model directory.
    """
    from recast.io import atomic_write_json
    from recast.metrics import mean_std
    from recast.train import SequenceTask, learn_sequence, versions

    model = _load_model(args.directory)
    _check_method(model, args)
    method = getattr(model, "method", "recast")
    tasks = []
    for entry in entries:
        splits = _open(entry["data"], model, augment=config.augment, val_fraction=args.val_fraction,
                       seed=args.data_seed)
        tasks.append(SequenceTask(entry["name"], entry["data"], splits.train, splits.val, splits.test,
                                  splits.classes, splits.split_info))
    runs, files = [], []
    for index, seed in enumerate(seeds):
        model = model if index == 0 else _load_model(args.directory)
        on_task = _task_saver(args.directory, seed, save=index == 0 and dist.is_main)
        run = learn_sequence(model, tasks, config.updated(seed=seed), dist=dist, own_bn=args.own_bn,
                             progress=not args.no_progress, on_task=on_task)
        backbone = (model.recipe or {}).get("name") if model.recipe else None
        run = {"method": method, "backbone": args.model or backbone, "suite": suite, "seed": seed,
               "method_options": getattr(model, "method_options", {}),
               "recast_config": model.config.to_dict() if hasattr(model, "config") else None,
               "train_config": config.updated(seed=seed).to_dict(),
               "versions": versions(), **run}
        runs.append(run)
        if dist.is_main:
            path = out / f"{suite}-{method}-seed{seed}.json"
            atomic_write_json(path, run)
            files.append(str(path))
    summary = {key: mean_std([r[key] for r in runs]) for key in ("average_accuracy", "forgetting", "bwt")}
    summary["tasks"] = {t.name: mean_std([r["tasks"][i]["test_accuracy"] for r in runs]) for i, t in enumerate(tasks)}
    result = {"method": method, "suite": suite, "seeds": seeds, "summary": summary, "versions": versions()}
    if dist.is_main:
        path = out / f"{suite}-{method}-summary.json"
        atomic_write_json(path, result)
        files.append(str(path))
    return {**result, "files": files}


def _task_saver(directory: str, seed: int, *, save: bool) -> Any:
    """``on_task`` for :func:`learn_sequence`: saves the task (first seed) or measures its size in a temp folder."""
    import tempfile

    def on_task(model: Any, task: Any, result: Any) -> int:
        meta = {"method": "recast", "seed": seed, "data": task.data, "split_info": task.split_info, **result.to_meta()}
        if save:
            return int(model.save_task(directory, task.name, meta=meta)["bytes"])
        with tempfile.TemporaryDirectory() as scratch:
            return int(model.save_task(scratch, task.name)["bytes"])

    return on_task


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds lists no seed")
    return seeds


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
def _cmd_eval(args: argparse.Namespace) -> int:
    from recast.distributed import default_device
    from recast.train import check_classes, evaluate

    model = _load_model(args.directory)
    _require_task(model, args.task)
    model.set_task(args.task)
    splits = _open(args.data, model, augment=False, val_fraction=args.val_fraction, seed=args.data_seed)
    check_classes(model, args.task, splits.classes)
    dataset = getattr(splits, args.split)
    device = args.device or default_device()
    model.to(device)
    accuracy = evaluate(model, dataset, batch_size=args.batch_size, device=device)
    result = {"task": args.task, "split": args.split, "accuracy": accuracy, "samples": len(dataset), "data": args.data}
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(f"task {args.task}: {args.split} accuracy {accuracy:.4f} on {len(dataset)} images")
    return 0


# ---------------------------------------------------------------------------------- tasks
def task_records(directory: str | Path) -> list[dict[str, Any]]:
    """The task records of a model directory, read from ``tasks/*.json`` without loading any weights."""
    from recast.format import CONFIG_FILE, TASKS_DIR
    from recast.io import read_json

    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise FileFormatError(f"{directory}: not a recast model directory (no {CONFIG_FILE})")
    rows = []
    for path in sorted((directory / TASKS_DIR).glob("*.json")):
        record = read_json(path)
        metrics = record.get("metrics") or {}
        rows.append({
            "task": record.get("task", path.stem), "num_classes": record.get("num_classes"),
            "params": record.get("params", {}), "bytes": record.get("bytes"),
            "test_accuracy": metrics.get("test_accuracy"), "val_accuracy": metrics.get("val_accuracy"),
            "method": record.get("method"), "seed": record.get("seed"),
        })
    return rows


def _cmd_tasks(args: argparse.Namespace) -> int:
    from recast.format import BACKBONE_FILE

    rows = task_records(args.directory)
    backbone = Path(args.directory) / BACKBONE_FILE
    backbone_bytes = backbone.stat().st_size if backbone.is_file() else None
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
    from recast.data.images import load_image
    from recast.data.transforms import transforms_for

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    model = _load_model(args.directory)
    _require_task(model, args.task)
    model.set_task(args.task)
    model.eval()
    transform = transforms_for(model.net, train=False)
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
