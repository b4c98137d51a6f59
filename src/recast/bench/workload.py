"""What ``recast bench --perf`` measures: the setup (backbone, batch, threads, device, precision), the
models of each side built for training, and one training step.

Kept apart from :mod:`recast.bench.perf`, which times these in fresh processes and pools the figures.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from recast.config import RecastConfig
from recast.distributed import check_device
from recast.model import RecastModel
from recast.recipe import create_timm

PRECISIONS = ("fp32", "bf16")
WORKER_METHODS = ("recast-att", "recast-mlp", "recast-att+mlp", "lora", "full", "linear")


@dataclass(frozen=True)
class PerfSetup:
    """The backbone (a timm name and its kwargs), batch, repeats and threads of every figure."""

    model: str = "vit_small_patch16_224"
    kwargs: dict[str, Any] = field(default_factory=dict)
    batch: int = 8
    repeats: int = 24  # interleaved A/B pairs per ratio (the cheap switch figure uses SWITCH_PAIRS_FACTOR x as many)
    warmup: int = 1  # untimed calls of each side first, in every process (the next call is already at speed)
    threads: int = 1  # torch.set_num_threads in every measuring process: one core is the stable choice
    isolate: bool = True  # fresh processes for training steps, peak memory and eval (off: quick runs, tests, GPUs)
    device: str = "cpu"  # "cuda" or "cuda:N": every model and batch lives there
    precision: str = "fp32"  # "bf16": forwards under autocast (the weights and optimiser state stay fp32)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        check_device(self.device)

    @property
    def on_cuda(self) -> bool:
        """Whether the models run on a CUDA device."""
        return self.device == "cuda" or self.device.startswith("cuda:")

    @property
    def image_size(self) -> int:
        """Input side length: ``img_size`` when given, else 224."""
        return int(self.kwargs.get("img_size", 224))

    def base(self) -> nn.Module:
        """A fresh base model with random weights and a 10-class head, on the setup's device."""
        return create_timm(self.model, **{"num_classes": 10, **self.kwargs}).to(self.device)

    def recast_config(self, target: str, base: nn.Module) -> Any:
        """The paper's G=6, n=2, K=2 where the depth allows it (one group otherwise)."""
        return RecastConfig(target=target, groups=6 if len(base.blocks) % 6 == 0 else 1)

    def images(self) -> torch.Tensor:
        """A random batch of the setup's size, on the setup's device."""
        return torch.randn(self.batch, 3, self.image_size, self.image_size, device=self.device)

    def labels(self) -> torch.Tensor:
        """Random labels for :meth:`images`."""
        return torch.randint(10, (self.batch,), device=self.device)

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast on the setup's device when ``precision`` asks for it, else nothing."""
        return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def sync(self) -> None:
        """Wait for the device's queued work, so that a timed call includes it (nothing on a CPU)."""
        if self.on_cuda:
            torch.cuda.synchronize(self.device)


def lora_model(base: nn.Module, rank: int = 8) -> nn.Module:
    """PEFT LoRA on the fused qkv (r=8), with the head trainable as PEFT users do."""
    # Deferred: PEFT (and the transformers it loads, ~70 MB resident) is the LoRA side's own cost,
    # so a process measuring a RECAST model's peak memory must not carry it.
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["qkv"], modules_to_save=["head"])
    return get_peft_model(base, config)


def build_for_training(method: str, setup: PerfSetup) -> nn.Module:
    """The model whose training step ``method`` names, with only its own parameters trainable."""
    base = setup.base()
    if method.startswith("recast-"):
        # In place, as PEFT's get_peft_model wraps the LoRA side's base: each side holds one copy.
        model = RecastModel.from_base(base, setup.recast_config(method.removeprefix("recast-"), base), inplace=True)
        model.add_task("t", 10)
        model.set_task("t")
        return model
    if method == "lora":
        return lora_model(base)
    if method == "linear":
        base.requires_grad_(False)
        base.head.requires_grad_(True)
    return base  # full: every weight


def train_step(model: nn.Module, setup: PerfSetup) -> Callable[[], None]:
    """One AdamW step of ``model`` (forward, backward, clip, update) on a fixed random batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=1e-4)
    images, labels = setup.images(), setup.labels()
    model.train()

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        with setup.autocast():
            loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        setup.sync()

    return step
