"""Tiny models and snapshots shared by the reliability tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from recast import RecastConfig, RecastModel
from recast.methods import build_method
from recast.protocol import TaskModel
from tests.helpers import tiny_vit


def tiny_model(seed: int = 0, tasks: tuple[str, ...] = ("a",)) -> RecastModel:
    """A 2-block ViT RECAST model with extra tasks whose coefficients differ from mimicry."""
    model = RecastModel.from_base(tiny_vit(depth=2, seed=seed), RecastConfig(target="att", groups=1)).eval()
    for index, name in enumerate(tasks):
        model.add_task(name, 3 + index)
        nudge(model, name, seed=seed * 100 + index)
    return model


def tiny_method(method: str, seed: int = 0, tasks: tuple[str, ...] = ("a",)) -> TaskModel:
    """Any method of the registry on a 2-block ViT (``seed`` picks the backbone), with nudged extra tasks."""
    options = {"groups": 1} if method.startswith("recast") else {}
    model = build_method(method, tiny_vit(depth=2, seed=seed), **options).eval()
    for index, name in enumerate(tasks):
        model.add_task(name, 3 + index)
        nudge(model, name, seed=seed * 100 + index)
    return model


def nudge(model: TaskModel, task: str, seed: int = 0, amount: float = 0.3) -> None:
    """Move task ``task``'s trainable state (coefficients, adapters, head) by a seeded amount, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for params in model._state_parameters(task).values():
            for value in params:
                value.add_(amount * torch.randn(value.shape, generator=generator))


def shift_backbone(model: RecastModel, seed: int = 0) -> None:
    """Change the banks (so the fingerprint changes), as re-running mimicry would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bank in model.banks.values():
            bank.templates.add_(0.01 * torch.randn(bank.templates.shape, generator=generator))


def images() -> torch.Tensor:
    """A fixed batch of 16-px images."""
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def outputs(model: RecastModel) -> dict[str, torch.Tensor]:
    """Every task's logits on :func:`images` (restores the active task)."""
    active, result = model.active_task, {}
    with torch.no_grad():
        for name in model.tasks:
            model.set_task(name)
            result[name] = model(images())
    if active is not None:
        model.set_task(active)
    return result


def snapshot(model: RecastModel) -> dict[str, Any]:
    """What must not change after a refused load: task names, active task, every output."""
    return {"tasks": list(model.tasks), "active": model.active_task, "outputs": outputs(model)}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Snapshots (or output dicts) equal bit for bit."""
    if isinstance(a.get("outputs"), dict):
        plain = [k for k in a if k != "outputs"]
        return all(a[k] == b.get(k) for k in plain) and same(a["outputs"], b["outputs"])
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def flip_byte(path: Path, offset: int = -3) -> None:
    """Flip every bit of one byte of ``path``."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def state(model: RecastModel) -> dict[str, Any]:
    """A cheaper snapshot for many examples: task names, active task, every stored task tensor, staging keys."""
    tensors = {f"{t}/{k}": v.clone() for t in model.tasks for k, v in model.task_tensors(t).items()}
    keys = sorted(f"{n}:{k}" for n, module in model.task_modules() for k in module.per_task)
    return {"tasks": list(model.tasks), "active": model.active_task, "outputs": tensors, "keys": keys}
