"""``recast bench --perf``: speed and memory of RECAST against its peers, as ratios from one run.

Every ratio is A over B (lower is better) with both absolute figures beside it. Training step
time and peak memory are measured in a fresh worker process per method (``python -m
recast.bench.perf --worker METHOD``) so that one method's allocations cannot inflate another's
peak; the rest runs in this process. The backbone is timm ``vit_small_patch16_224`` at 224 px by
default (random weights: speed does not depend on their values) and the batch is the same for all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from recast.config import RecastConfig
from recast.format import task_records
from recast.model import RecastModel
from recast.recipe import create_timm
from recast.train import peak_rss_mb

WORKER_METHODS = ("recast-att", "recast-mlp", "recast-att+mlp", "lora", "full", "linear")


@dataclass(frozen=True)
class PerfSetup:
    """The backbone (a timm name and its kwargs) and batch every figure is measured on."""

    model: str = "vit_small_patch16_224"
    kwargs: dict[str, Any] = field(default_factory=dict)
    batch: int = 8
    steps: int = 4
    warmup: int = 2
    isolate: bool = True  # one fresh process per training-step measurement (clean peak memory)

    @property
    def image_size(self) -> int:
        """Input side length: ``img_size`` when given, else 224."""
        return int(self.kwargs.get("img_size", 224))

    def base(self) -> nn.Module:
        """A fresh base model with random weights and a 10-class head."""
        return create_timm(self.model, **{"num_classes": 10, **self.kwargs})

    def recast_config(self, target: str, base: nn.Module) -> Any:
        """The paper's G=6, n=2, K=2 where the depth allows it (one group otherwise)."""
        return RecastConfig(target=target, groups=6 if len(base.blocks) % 6 == 0 else 1)

    def images(self) -> torch.Tensor:
        """A random batch of the setup's size."""
        return torch.randn(self.batch, 3, self.image_size, self.image_size)


def _lora(base: nn.Module, rank: int = 8) -> nn.Module:
    """PEFT LoRA on the fused qkv (r=8), with the head trainable as PEFT users do."""
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["qkv"], modules_to_save=["head"])
    return get_peft_model(base, config)


def build_for_training(method: str, setup: PerfSetup) -> nn.Module:
    """The model whose training step ``method`` names, with only its own parameters trainable."""
    base = setup.base()
    if method.startswith("recast-"):
        model = RecastModel.from_base(base, setup.recast_config(method.removeprefix("recast-"), base))
        model.add_task("t", 10)
        model.set_task("t")
        return model
    if method == "lora":
        return _lora(base)
    if method == "linear":
        base.requires_grad_(False)
        base.head.requires_grad_(True)
    return base  # full: every weight


def time_train_steps(model: nn.Module, setup: PerfSetup) -> float:
    """Median seconds of one AdamW step (forward, backward, clip, update) after the warm-up steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=1e-4)
    images, labels = setup.images(), torch.randint(10, (setup.batch,))
    model.train()
    times = []
    for step in range(setup.warmup + setup.steps):
        start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        if step >= setup.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(method: str, setup: PerfSetup) -> dict[str, float]:
    """Run in a fresh process: step time and this process's peak RSS (MiB) for ``method``."""
    torch.manual_seed(0)
    model = build_for_training(method, setup)
    baseline_rss = peak_rss_mb()
    seconds = time_train_steps(model, setup)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"step_seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rss_before_training_mb": baseline_rss,
            "trainable_params": trainable}


def _run_worker(method: str, setup: PerfSetup) -> dict[str, float]:
    if not setup.isolate:  # quick runs and tests: same numbers, peak memory shared between methods
        return worker(method, setup)
    command = [sys.executable, "-m", "recast.bench.perf", "--worker", method, "--setup", json.dumps(asdict(setup))]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"perf worker {method} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def ratio(a: float, b: float, unit: str) -> dict[str, Any]:
    """A over B with both figures."""
    return {"ratio": a / b, "a": a, "b": b, "unit": unit}


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: first-call costs (lazy imports, allocator) are not what is compared
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def switch_figures(setup: PerfSetup, repeats: int = 7) -> dict[str, Any]:
    """Task switch from a file: RECAST (load + activate + weight generation) vs PEFT load_adapter + set_adapter."""
    base = setup.base()
    model = RecastModel.from_base(base, setup.recast_config("att", base))
    peft_model = _lora(setup.base())
    with tempfile.TemporaryDirectory() as tmp:
        model.add_task("b", 10)
        model.save_pretrained(tmp)
        peft_model.save_pretrained(Path(tmp, "peft"))

        def recast_switch() -> None:
            model.set_task("base")
            model.load_task(tmp, "b", replace=True)
            model.set_task("b")
            with torch.no_grad():
                for _, module in model.task_modules():
                    if module.kind == "coefficients":
                        module.weight_for("b")  # what the first forward would generate

        counter = iter(range(10**6))

        def peft_switch() -> None:
            name = f"t{next(counter)}"
            peft_model.load_adapter(str(Path(tmp, "peft")), adapter_name=name)
            peft_model.set_adapter(name)

        recast_s, peft_s = _median_time(recast_switch, repeats), _median_time(peft_switch, repeats)
        sizes = {"recast_task_file_bytes": task_records(tmp)["b"]["bytes"],
                 "peft_adapter_file_bytes": Path(tmp, "peft", "adapter_model.safetensors").stat().st_size}
    return {"switch_recast_over_peft": {**ratio(recast_s, peft_s, "s"), **sizes}}


def eval_figures(setup: PerfSetup, repeats: int = 5) -> dict[str, Any]:
    """Evaluation forward (no grad) of a RECAST model and of its export, against the plain base."""
    base = setup.base()
    model = RecastModel.from_base(base, setup.recast_config("att+mlp", base)).eval()
    plain = model.export("base").eval()
    images = setup.images()
    with torch.no_grad():
        for net in (base, model, plain):
            net(images)  # warm up (and fill RECAST's weight cache once)
        times = {name: _median_time(lambda n=net: n(images), repeats)
                 for name, net in (("base", base), ("recast", model), ("export", plain))}
    return {"eval_recast_over_base": ratio(times["recast"], times["base"], "s"),
            "eval_export_over_base": ratio(times["export"], times["base"], "s")}


def mimicry_figures(setup: PerfSetup, iterative_steps: int = 1000) -> dict[str, Any]:
    """Closed-form SVD mimicry against the paper's iterative fit (its 1000 steps by default)."""
    base = setup.base()
    reports = {}
    for method, options in (("svd", {}), ("iterative", {"steps": iterative_steps})):
        start = time.perf_counter()
        model = RecastModel.from_base(base, setup.recast_config("att", base), mimicry=method, **options)
        reports[method] = {"seconds": time.perf_counter() - start, "weight_rel_error": model.mimicry_report["weight_rel_error"]}
    figure = ratio(reports["svd"]["seconds"], reports["iterative"]["seconds"], "s")
    figure.update({"svd_weight_rel_error": reports["svd"]["weight_rel_error"],
                   "iterative_weight_rel_error": reports["iterative"]["weight_rel_error"],
                   "iterative_steps": iterative_steps, "paper_iterative_steps": 1000})
    return {"mimicry_svd_over_iterative": figure}


def run_perf(setup: PerfSetup | None = None, progress: bool = True, iterative_steps: int = 1000) -> dict[str, Any]:
    """Every figure of ``recast bench --perf``; see the module docstring."""
    setup = setup or PerfSetup()
    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    workers = {}
    for method in WORKER_METHODS:
        say(f"training steps: {method} ({setup.model}, {setup.image_size} px, batch {setup.batch})")
        workers[method] = _run_worker(method, setup)
    step = {m: w["step_seconds"] for m, w in workers.items()}
    figures: dict[str, Any] = {
        "train_step_recast_att_over_lora": ratio(step["recast-att"], step["lora"], "s"),
        "train_step_recast_attmlp_over_full": ratio(step["recast-att+mlp"], step["full"], "s"),
        "train_step_recast_att_over_linear": ratio(step["recast-att"], step["linear"], "s"),
        "train_step_recast_mlp_over_full": ratio(step["recast-mlp"], step["full"], "s"),
        "peak_mem_recast_over_lora": ratio(workers["recast-att"]["peak_rss_mb"], workers["lora"]["peak_rss_mb"], "MiB"),
        "peak_mem_recast_attmlp_over_full": ratio(workers["recast-att+mlp"]["peak_rss_mb"], workers["full"]["peak_rss_mb"], "MiB"),
    }
    say("task switch from a file")
    figures.update(switch_figures(setup))
    say("evaluation forward")
    figures.update(eval_figures(setup))
    say("mimicry: svd vs iterative")
    figures.update(mimicry_figures(setup, iterative_steps))
    figures["setup"] = {**asdict(setup), "image_size": setup.image_size, "threads": torch.get_num_threads(),
                        "workers": workers}
    return figures


def main() -> None:
    """Worker entry point (``python -m recast.bench.perf --worker METHOD``)."""
    parser = argparse.ArgumentParser(description="one training-step measurement in a fresh process")
    parser.add_argument("--worker", choices=WORKER_METHODS, required=True)
    parser.add_argument("--setup", default="{}", help="PerfSetup fields as JSON")
    args = parser.parse_args()
    print(json.dumps(worker(args.worker, PerfSetup(**json.loads(args.setup)))))


if __name__ == "__main__":
    main()
