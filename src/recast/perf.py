"""Cost figures on this machine: training step time and memory, task switch and eval forward time.

:func:`train_step_figures` measures, on one backbone and one batch, in one run:

- RECAST (each target) versus full fine-tuning: median seconds per training step (forward,
  backward, AdamW step) and the peak resident memory while stepping, each method in a fresh
  process (``isolate=True``) so that one method's allocations do not inflate another's;
- task switch time (``set_task`` to another task plus the first forward, which composes the
  generated weights) and the steady eval forward time, versus the plain base model's forward.

Weights are random (timing does not depend on their values, and nothing is downloaded). Run it as
``python -m recast.perf --json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from typing import Any

import torch
from torch import nn


def _rss_mb() -> float:
    """Current resident memory of this process in MiB (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
    except OSError:
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextmanager
def _peak_rss(interval: float = 0.002) -> Iterator[dict[str, float]]:
    """Sample the resident memory while the block runs; yields a dict filled with ``start`` and ``peak``."""
    result = {"start": _rss_mb(), "peak": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak"] = max(result["peak"], _rss_mb())
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak"] = max(result["peak"], _rss_mb())


def _build_base(backbone: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(backbone, pretrained=False, **kwargs)


def _timed(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` calls after ``warmup`` unmeasured ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _measure_training(method: str, backbone: str, kwargs: dict[str, Any], batch: int, steps: int,
                      warmup: int, threads: int) -> dict[str, Any]:
    """One method's training-step figures (runs in a fresh process when isolated)."""
    from recast import RecastConfig, RecastModel

    torch.set_num_threads(threads)
    base = _build_base(backbone, kwargs)
    if method == "full":
        model: nn.Module = base.requires_grad_(True)
    else:
        model = RecastModel.from_base(base, RecastConfig(target=method.removeprefix("recast-")), mimicry="svd")
        model.add_task("t", 10)
        model.set_task("t")
        del base
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    size = kwargs.get("img_size", 224)
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    with _peak_rss() as memory:
        seconds = _timed(step, steps, warmup)
    return {"method": method, "step_seconds": seconds, "trainable_params": sum(p.numel() for p in params),
            "rss_before_mb": memory["start"], "peak_rss_mb": memory["peak"],
            "training_memory_mb": memory["peak"] - memory["start"]}


def _measure_inference(target: str, backbone: str, kwargs: dict[str, Any], batch: int, repeats: int,
                       threads: int) -> dict[str, Any]:
    """Task switch and eval forward time of RECAST versus the base model's plain forward."""
    from recast import RecastConfig, RecastModel

    torch.set_num_threads(threads)
    base = _build_base(backbone, kwargs).eval()
    model = RecastModel.from_base(base, RecastConfig(target=target), mimicry="svd").eval()
    model.add_task("other", 10)
    size = kwargs.get("img_size", 224)
    images = torch.randn(batch, 3, size, size)
    switches = []
    with torch.no_grad():
        base_seconds = _timed(lambda: base(images), repeats, 1)
        for i in range(repeats + 1):
            name = "other" if i % 2 == 0 else "base"
            started = time.perf_counter()
            model.set_task(name)
            model(images)
            switches.append(time.perf_counter() - started)
        set_only = _timed(lambda: model.set_task("base"), repeats, 1)
        model.set_task("base")
        eval_seconds = _timed(lambda: model(images), repeats, 1)
    return {"method": f"recast-{target}", "switch_plus_first_forward_seconds": statistics.median(switches[1:]),
            "set_task_seconds": set_only, "eval_forward_seconds": eval_seconds,
            "base_eval_forward_seconds": base_seconds}


def _run(isolate: bool, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Call ``fn(*args)`` here, or in a fresh spawned process when ``isolate``."""
    if not isolate:
        return fn(*args)
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def train_step_figures(
    backbone: str = "vit_small_patch16_224", *, model_kwargs: dict[str, Any] | None = None, batch: int = 8,
    steps: int = 5, warmup: int = 2, targets: tuple[str, ...] = ("att", "mlp", "att+mlp"),
    threads: int | None = None, isolate: bool = True,
) -> dict[str, Any]:
    """Training, switching and eval figures of RECAST targets vs full fine-tuning on one backbone and batch."""
    kwargs = {"num_classes": 10, **(model_kwargs or {})}
    threads = threads or torch.get_num_threads()
    methods = [f"recast-{t}" for t in targets] + ["full"]
    train = [_run(isolate, _measure_training, m, backbone, kwargs, batch, steps, warmup, threads) for m in methods]
    inference = [_run(isolate, _measure_inference, t, backbone, kwargs, batch, steps, threads) for t in targets]
    return {"backbone": backbone, "model_kwargs": kwargs, "batch": batch, "steps": steps, "threads": threads,
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count(), "torch": torch.__version__},
            "train": train, "inference": inference}


def main(argv: list[str] | None = None) -> int:
    """``python -m recast.perf``: print the figures (a table, or JSON with ``--json``)."""
    parser = argparse.ArgumentParser(prog="python -m recast.perf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="vit_small_patch16_224", help="timm architecture (random weights)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="measured repetitions (median reported)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = train_step_figures(args.backbone, model_kwargs={"img_size": args.img_size}, batch=args.batch,
                                 steps=args.steps, threads=args.threads)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"{figures['backbone']} @ {args.img_size}px, batch {figures['batch']}, {figures['threads']} threads")
    for row in figures["train"]:
        print(f"train {row['method']:<16} step {row['step_seconds']:.3f}s  peak RSS {row['peak_rss_mb']:.0f} MiB "
              f"(+{row['training_memory_mb']:.0f} while stepping)  trainable {row['trainable_params']}")
    for row in figures["inference"]:
        print(f"infer {row['method']:<16} switch+first forward {row['switch_plus_first_forward_seconds']:.4f}s  "
              f"set_task {row['set_task_seconds'] * 1e6:.0f}us  eval forward {row['eval_forward_seconds']:.4f}s  "
              f"base forward {row['base_eval_forward_seconds']:.4f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
