"""``recast bench``: run a comparison suite, or measure the speed figures, and write the report."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from recast import bench
from recast.bench.perf import PERF_GROUPS, run_perf
from recast.bench.perf_table import format_ratio, load_perf_runs, perf_table
from recast.bench.report import write_report
from recast.bench.tuning import DEFAULT_GRID, grid_points, parse_grid, seeds_label, tuning_seeds
from recast.bench.workload import PRECISIONS, PerfSetup
from recast.cli import edge, serve
from recast.distributed import check_device, default_device
from recast.errors import ConfigError
from recast.train import AUGMENTS

ALIASES = {  # recast bench --serve / --edge: the same code and options as these commands
    "serve": ("serve-bench", serve.BENCH_DESCRIPTION, serve.add_bench_arguments, argparse.ArgumentDefaultsHelpFormatter),
    "edge": ("edge-bench", edge.BENCH_DESCRIPTION, edge.add_bench_arguments, argparse.HelpFormatter),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand."""
    parser = subparsers.add_parser(
        "bench",
        help="compare RECAST with adapters and baselines; write JSON per run, RESULTS.md and plots",
        description="Learn a suite of tasks with every method on every backbone and seed, one run at a time "
        "(finished runs are kept and skipped), then write RESULTS.md and the plots made from the run files. "
        "Suites: 'offline' (built-in datasets, shipped 32-px ViT and ResNet, EfficientNet-Lite0; runs on a "
        "CPU) and 'paper' (ViT-S/16 and ResNet-34 with hub weights on six datasets from --data-root; for a GPU).",
    )
    parser.add_argument("--suite", choices=("offline", "effnet", "presets", "paper"), default="offline",
                        help="offline: the shipped 32-px ViT and ResNet (and EfficientNet-Lite0); effnet: "
                        "EfficientNet-Lite0's ImageNet weights at 96 px on the same six tasks; presets: the reference release's "
                        "AdaptFormer and Piggyback presets against the defaults (quick settings, one seed); paper: the "
                        "paper's datasets under --data-root (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="offline suite reduced: subsampled training, few epochs, one seed")
    parser.add_argument("--methods", nargs="+", help="only these methods (e.g. recast lora linear, or recast:att)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: the suite's; the paper's are 42 1998 3142592)")
    parser.add_argument("--backbones", nargs="+", help="only these backbones of the suite (e.g. vit32)")
    parser.add_argument("--data-root", type=Path, default=Path("data"), help="paper suite: folder holding the datasets")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and which data roots are missing")
    parser.add_argument("--report-only", action="store_true", help="only rebuild RESULTS.md and plots from --out/runs")
    parser.add_argument("--restart", action="store_true", help="rerun runs whose result file already exists")
    parser.add_argument("--image-size", type=int, metavar="N",
                        help="input side length for every backbone (default: each backbone's own; with --perf: 224); "
                        "recorded in every run file")
    parser.add_argument("--augment", choices=AUGMENTS,
                        help="training augmentation: default, reference (the reference release's preset) or none")
    parser.add_argument("--tune", action="store_true",
                        help="choose each method's learning rates from a small grid by validation accuracy on the first "
                        "seed (RECAST: coefficients x head; LoRA and adapters: adapter x head; linear: head; full: "
                        "backbone x head), then run every seed with them; grid, scores and choice go into the run files")
    parser.add_argument("--tune-seeds", type=int, default=1, metavar="N",
                        help="with --tune, score each grid point by its mean validation accuracy over the suite's "
                        "first N seeds (default 1; costs N times the tuning runs): on small training sets one seed's "
                        "validation can prefer a rate that the others do not")
    parser.add_argument("--tune-grid", action="append", default=[], metavar="KIND=LR,LR",
                        help="replace the grid of one kind, repeatable: head, coefficients, adapter, backbone (defaults: "
                        + "; ".join(f"{k} {','.join(f'{v:g}' for v in vs)}" for k, vs in DEFAULT_GRID.items())
                        + "); RECAST + an adapter ties its coefficients to the adapter's rate unless coefficients "
                        "is given")
    parser.add_argument("--max-train-images", type=int, metavar="N",
                        help="train on a seeded random subset of at most N images per task; 0: every image (default: "
                        "the suite's)")
    parser.add_argument("--epochs", type=int, metavar="N", help="epochs per task (default: the suite's)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N, for training and for --perf (default: a GPU when "
                        "there is one); recorded in every run file")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="fp32, or bf16 autocast (default: fp32); recorded in every run file")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="data-loading worker processes per run (default: 0, load in the training process)")
    parser.add_argument("--perf", action="store_true", help="measure the speed and memory ratios instead (see --json)")
    parser.add_argument("--json", action="store_true", help="with --perf: print one JSON object of ratios")
    parser.add_argument("--repeats", type=int, default=PerfSetup.repeats, metavar="N",
                        help="with --perf: interleaved A/B pairs per ratio (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=PerfSetup.threads, metavar="N",
                        help="with --perf: torch threads of every measuring process (default: %(default)s)")
    parser.add_argument("--model", default=PerfSetup.model, metavar="NAME",
                        help="with --perf: the timm ViT measured, random weights (default: %(default)s; e.g. "
                        "vit_base_patch16_224)")
    parser.add_argument("--batch", type=int, default=PerfSetup.batch, metavar="N",
                        help="with --perf: images per training step and evaluation forward (default: %(default)s)")
    parser.add_argument("--perf-only", nargs="+", choices=PERF_GROUPS, metavar="GROUP",
                        help="with --perf: measure only these figure groups, e.g. after a change to one of them "
                        f"({', '.join(PERF_GROUPS)}; default: all)")
    parser.add_argument("--perf-table", nargs="+", metavar="FILE",
                        help="print the Markdown table of several '--perf --json' files instead: each ratio in every "
                        "run, its spread over the runs, the last run's times and spreads")
    parser.add_argument("--serve", nargs=argparse.REMAINDER, metavar="OPTION",
                        help="run the serving benchmark instead, exactly as 'recast serve-bench' with the options "
                        "that follow (load test, memory per task, micro-benchmark; JSON under results/serve/); "
                        "see 'recast bench --serve --help'")
    parser.add_argument("--edge", nargs=argparse.REMAINDER, metavar="DIR OPTION",
                        help="run the edge benchmark instead, exactly as 'recast edge-bench DIR' with the options "
                        "that follow (ONNX Runtime latency, task switch, bytes, packed accuracy; JSON under "
                        "results/edge/); see 'recast bench --edge --help'")
    parser.set_defaults(func=run)
    parser.set_defaults(bench_defaults=vars(parser.parse_args([])))


def run(args: argparse.Namespace) -> int:
    """Dispatch to the serving or edge benchmark, the perf figures, the report, the dry run or the suite."""
    if args.serve is not None or args.edge is not None:
        return run_alias(args)
    if args.perf_table:
        print(perf_table(load_perf_runs(args.perf_table)))
        return 0
    device = check_device(args.device) if args.device else default_device()
    if args.perf:
        if min(args.repeats, args.threads, args.batch) < 1:
            raise ConfigError("--repeats, --threads and --batch must be at least 1")
        kwargs = {"img_size": args.image_size} if args.image_size else {}
        # On a GPU one process measures every figure (see recast.bench.perf): CUDA start-up per process costs seconds.
        setup = PerfSetup(args.model, kwargs, batch=args.batch, repeats=args.repeats, threads=args.threads,
                          isolate=device == "cpu", device=device, precision=args.precision or "fp32")
        figures = run_perf(setup, progress=not args.json, groups=args.perf_only or PERF_GROUPS)
        print(json.dumps(figures, indent=2) if args.json else _format_perf(figures))
        return 0
    if args.report_only:
        print(f"wrote {write_report(args.out)}")
        return 0
    suites = {"offline": lambda: bench.offline_suite(args.quick), "effnet": bench.effnet_suite,
              "presets": bench.presets_suite,
              "paper": lambda: bench.paper_suite(args.data_root)}
    suite = suites[args.suite]()
    if args.workers is not None and args.workers < 0:
        raise ConfigError("--workers must be 0 or more")
    suite = bench.with_training(suite, image_size=args.image_size, augment=args.augment, epochs=args.epochs,
                                precision=args.precision, num_workers=args.workers)
    if args.max_train_images is not None:
        if args.max_train_images < 0:
            raise ConfigError("--max-train-images must be 0 (every image) or more")
        suite = dataclasses.replace(suite, max_train_images=args.max_train_images or None)
    runs = bench.plan(suite, args.methods, args.seeds, args.backbones)
    grid = parse_grid(args.tune_grid)
    print(bench.describe(suite, runs))
    tune_on = tuning_seeds(suite, args.tune_seeds)
    if len(tune_on) > 1 and not args.tune:
        raise ConfigError("--tune-seeds applies to --tune: add --tune, or leave --tune-seeds out")
    if args.tune:
        on = "first seed" if len(tune_on) == 1 else seeds_label(tune_on)
        for method in dict.fromkeys(r.method for r in runs):
            points = grid_points(method, grid)
            print(f"  tune {method}: {len(points)} learning-rate points on validation, {on}: {points}")
    if args.dry_run:
        return 0
    if bench.missing_data(suite):
        print("recast: error: some data roots are missing (see above); fix --data-root or download them first")
        return 2
    report = bench.run_suite(suite, runs, args.out, progress=True, resume=not args.restart, tune_lrs=args.tune,
                             grid=grid, device=device, tune_seeds=args.tune_seeds)
    print(f"wrote {report} and the plots beside it")
    return 0


def run_alias(args: argparse.Namespace) -> int:
    """``--serve`` / ``--edge``: parse what follows with that command's own options and run it."""
    if args.serve is not None and args.edge is not None:
        raise ConfigError("give --serve or --edge, not both")
    name = "serve" if args.serve is not None else "edge"
    defaults = args.bench_defaults or {}
    ignored = sorted(k for k, v in vars(args).items() if k in defaults and k not in ALIASES and v != defaults[k])
    if ignored:
        options = ", ".join("--" + k.replace("_", "-") for k in ignored)
        raise ConfigError(f"{options} cannot go with --{name}: put the options of the {name} benchmark after --{name}")
    command, description, add_arguments, formatter = ALIASES[name]
    parser = argparse.ArgumentParser(prog=f"recast bench --{name}", description=f"{description} (Same as 'recast "
                                     f"{command}'.)", formatter_class=formatter)
    add_arguments(parser)
    chosen = parser.parse_args(getattr(args, name))
    return int(chosen.func(chosen) or 0)


def _span(low_high: list[float]) -> str:
    return f"{format_ratio(low_high[0])}-{format_ratio(low_high[1])}"


def _format_perf(figures: dict) -> str:
    lines = []
    for name, entry in figures.items():
        if isinstance(entry, dict) and "ratio" in entry:
            spread = f"IQR {_span(entry['iqr'])}, " if "iqr" in entry else ""
            if "median_interval" in entry:
                spread += f"median within {_span(entry['median_interval'])}, "
            per_process = entry.get("process_ratios") or []
            where = (f" in {entry['processes']} processes, their medians {_span([min(per_process), max(per_process)])}"
                     if len(per_process) > 1 else "")
            lines.append(f"{name:40s} {format_ratio(entry['ratio']):>8s}   ({spread}n={entry['repeats']}{where}; "
                         f"{entry['a']:.4g} {entry['unit']} / {entry['b']:.4g} {entry['unit']})")
    setup = figures.get("setup", {})
    lines.append(f"torch threads: {setup.get('threads')}; ratios are medians of interleaved A/B pairs")
    return "\n".join(lines)
