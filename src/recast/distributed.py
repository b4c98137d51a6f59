"""The little that training needs from ``torch.distributed``: who am I, where do I run, sum this.

A process started by ``torchrun`` finds ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in its environment;
:func:`init_distributed` then joins the process group (NCCL on GPUs, gloo on the CPU). A plain
process gets a one-process context and never touches ``torch.distributed``, so the training loop
has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from recast.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """This process's place in a (possibly one-process) training job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (a no-op alone)."""
        if self.enabled:
            torch_dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all processes (as float64)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor.tolist()

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` holds on every process (used to stop all ranks together)."""
        return bool(self.sum([0.0 if flag else 1.0])[0] == 0.0)


def default_device(local_rank: int = 0) -> str:
    """``cuda:<local_rank>`` where a GPU exists, else ``cpu``."""
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """``device`` if it names a device this process can use (``cpu``, ``cuda``, ``cuda:N``), else a ConfigError."""
    kind, sep, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (sep and (kind == "cpu" or not index.isdigit())):
        raise ConfigError(f"device {device!r}: use cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA GPU is visible to this process; use cpu")
    if kind == "cuda" and sep and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def init_distributed(device: str | None = None) -> DistContext:
    """Join the ``torchrun`` process group if this process was started by it; else a single process.

    ``device`` overrides the automatic choice (``cpu`` forces gloo even where GPUs exist).
    """
    if device is not None:
        check_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=device or default_device())
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = device or default_device(local_rank)
    if chosen.startswith("cuda"):
        chosen = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if chosen.startswith("cuda") else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


def shutdown(context: DistContext) -> None:
    """Leave the process group (when one was joined)."""
    if context.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
