"""``recast mimic``: build a RECAST model from a pretrained one by Neural Mimicry, with a fidelity report.

Parses and prints only: load the backbone, ``RecastModel.from_base`` with the method, optionally
``refine_with_data`` on images, then write ``DIR`` (``save_pretrained``) and ``DIR/fidelity.json``
(:func:`recast.mimicry.fidelity_record`). ``--curve`` measures fidelity and size for
n = 1 .. layers per group + 1 instead; ``--bench`` runs the method comparison on real pretrained
matrices (:mod:`recast.bench.mimicry`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recast.backbones import load_backbone
from recast.bench.mimicry import run_bench
from recast.cli.options import parse_options
from recast.config import PRESET_TARGETS, RecastConfig
from recast.errors import ConfigError
from recast.io import atomic_write_json
from recast.mimicry import (
    compression_curve,
    fidelity_record,
    fidelity_summary,
    method_names,
    refine_with_data,
    save_curve,
    steps_option,
    write_fidelity,
)
from recast.mimicry.images import load_images
from recast.model import RecastModel


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mimic`` to the ``recast`` command."""
    parser = subparsers.add_parser(
        "mimic",
        help="rewrite a pretrained model as template banks fitted to its weights (Neural Mimicry)",
        description="Rewrite the targeted layers of a pretrained model as template banks plus coefficients fitted "
        "to its weights, and write the model directory with fidelity.json (weight cosine and relative error per "
        "layer; feature cosine per block and top-1 agreement with --images). Methods: svd (closed form, exact at "
        "n = layers per group), iterative (the paper's fit), svd+iterative, encoder, vae.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", metavar="SPEC", help="timm:NAME (hub weights, or --weights FILE), torchvision:NAME, "
                        "effnet-lite0, or a shipped backbone")
    parser.add_argument("--weights", metavar="FILE", help="local safetensors or .pth checkpoint for --model")
    parser.add_argument("--target", default="att", help="att, mlp, att+mlp, conv, or comma-separated module-name "
                        "patterns such as 'blocks.*.attn.proj,blocks.*.mlp.fc1'")
    parser.add_argument("--groups", type=int, help="G: groups per role (default: 6 for ViT targets, else 1)")
    parser.add_argument("--templates", type=int, help="n: templates per bank (default: layers per group, exact)")
    parser.add_argument("--coef-sets", type=int, default=2, help="K: coefficient sets per layer")
    parser.add_argument("--method", default="svd", help=f"one of {', '.join(method_names())}")
    parser.add_argument("--steps", type=int, help="optimisation steps (iterative, svd+iterative) or epochs (encoder, vae)")
    parser.add_argument("--lr", type=float, help="learning rate of the method")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="any other method option (JSON value), e.g. noise=0.0001, beta=1e-5; repeatable")
    parser.add_argument("--seed", type=int, default=42, help="seed of random inits")
    parser.add_argument("--images", metavar="SPEC", help="images for feature fidelity: a data spec "
                        "(imagefolder:PATH, builtin:NAME, ...) or a folder of image files")
    parser.add_argument("--num-images", type=int, default=32, help="how many images to use from --images")
    parser.add_argument("--refine-data", action="store_true", help="refine templates and coefficients to match "
                        "the original's block outputs on --images (useful when n < layers per group)")
    parser.add_argument("--refine-steps", type=int, default=100, help="steps of --refine-data")
    parser.add_argument("--refine-lr", type=float, default=1e-4, help="Adam learning rate of --refine-data")
    parser.add_argument("--curve", action="store_true", help="measure fidelity and backbone bytes for each n "
                        "instead; writes curve.json and curve.png into --out")
    parser.add_argument("--curve-ns", metavar="N,N,...", help="the n values of --curve (default: 1 .. layers per group + 1)")
    parser.add_argument("--bench", action="store_true", help="run the mimicry benchmark on real pretrained matrices "
                        "(MiniLM-L6 layers in a ViT-S, EfficientNet-Lite0 convolutions); writes bench.json into --out")
    parser.add_argument("--bench-methods", default=",".join(method_names()), help="methods of --bench")
    parser.add_argument("--bench-suites", metavar="NAMES", help="suites of --bench (default: vit,conv)")
    parser.add_argument("--out", metavar="DIR", help="output directory")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``recast mimic``."""
    if args.bench:
        return _run_bench(args)
    if not args.model:
        raise ConfigError("recast mimic needs --model SPEC (or --bench); see `recast models list`")
    if not args.out:
        raise ConfigError("recast mimic needs --out DIR, where the model (or the curve) is written")
    base = load_backbone(args.model, weights=args.weights)
    config = _config(args)
    options = _method_options(args)
    images = load_images(args.images, base, args.num_images) if args.images else None
    if args.refine_data and images is None:
        raise ConfigError("--refine-data needs --images SPEC (unlabeled images the original model sees)")
    if args.curve:
        return _run_curve(args, base, config, options, images)
    out = Path(args.out)
    model = RecastModel.from_base(base, config, mimicry=args.method, **options)
    if args.refine_data:
        refine_with_data(model, base, images, steps=args.refine_steps, lr=args.refine_lr, seed=args.seed,
                         progress=not args.no_progress)
    record = {**fidelity_record(model, base, images), "model": args.model}
    model.save_pretrained(out)
    path = write_fidelity(out, record)
    _print_summary({**fidelity_summary(record), "out": str(out)}, path, args.json)
    return 0


def _config(args: argparse.Namespace) -> RecastConfig:
    target = args.target if args.target in PRESET_TARGETS else tuple(p.strip() for p in args.target.split(",") if p.strip())
    return RecastConfig(target=target, groups=args.groups, templates=args.templates, coef_sets=args.coef_sets)


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method's keyword options from ``--steps``, ``--lr``, ``--option`` and the progress flag."""
    options: dict[str, Any] = {"seed": args.seed, "progress": not args.no_progress}
    if args.steps is not None:
        options[steps_option(args.method)] = args.steps
    if args.lr is not None:
        options["lr"] = args.lr
    options.update(parse_options(args.option, flag="--option"))
    return options


def _run_curve(
    args: argparse.Namespace, base: nn.Module, config: RecastConfig, options: dict[str, Any], images: torch.Tensor | None
) -> int:
    try:
        ns = [int(n) for n in args.curve_ns.split(",")] if args.curve_ns else None
    except ValueError:
        raise ConfigError(f"--curve-ns takes comma-separated integers, got {args.curve_ns!r}") from None
    points = compression_curve(base, config, ns, args.method, images, builder=RecastModel.from_base, **options)
    record = {"model": args.model, "config": config.to_dict(), "method": args.method, "points": points}
    json_path, png_path = save_curve(record, args.out, title=f"{args.model} {args.target}: {args.method}")
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"{'n':>3} {'rel_error':>10} {'cos_min':>9} {'backbone MiB':>12} {'ratio':>6}")
        for p in points:
            print(f"{p['templates']:>3} {p['weight_rel_error']:>10.3g} {p['weight_cosine_min']:>9.5f} "
                  f"{p['backbone_bytes'] / 2**20:>12.2f} {p['backbone_ratio']:>6.2f}")
        print(f"wrote {json_path} and {png_path}")
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.bench_methods.split(",") if m.strip()]
    suite_names = [s.strip() for s in args.bench_suites.split(",") if s.strip()] if args.bench_suites else None

    def save(record: dict[str, Any]) -> None:
        if args.out:
            atomic_write_json(Path(args.out) / "bench.json", record)

    record = run_bench(methods, suite_names=suite_names, progress=not args.no_progress, steps=args.steps, on_row=save)
    print(json.dumps(record, indent=2) if args.json else _bench_table(record))
    return 0


def _bench_table(record: dict[str, Any]) -> str:
    lines = [f"{'suite':<10} {'method':<14} {'n':>4} {'seconds':>9} {'rel_error':>10} {'cos_min':>9}"]
    for row in record["rows"]:
        lines.append(f"{row['suite']:<10} {row['method']:<14} {row['n']:>4} {row['seconds']:>9.2f} "
                     f"{row['weight_rel_error']:>10.3g} {row['weight_cosine_min']:>9.5f}")
    lines += [f"{k}: {v}" for k, v in record.get("summary", {}).items()]
    return "\n".join(lines)


def _print_summary(summary: dict[str, Any], path: Path, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(f"method {summary['method']}: {summary['seconds']:.2f} s, weight cosine min {summary['weight_cosine_min']:.6f} "
          f"mean {summary['weight_cosine_mean']:.6f}, relative error {summary['weight_rel_error']:.3g}")
    print(f"backbone {summary['backbone_bytes'] / 2**20:.2f} MiB (original {summary['original_bytes'] / 2**20:.2f} MiB), "
          f"{summary['effective_coefficients']} effective coefficients per task")
    if "features" in summary:
        f = summary["features"]
        print(f"features on {f['images']} images: block cosine min {f['feature_cosine_min']:.5f}, "
              f"top-1 agreement {f['top1_agreement']:.3f}")
    print(f"wrote {summary['out']} and {path}")
