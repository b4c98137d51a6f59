"""Model-level fidelity and data-driven refinement of a built RECAST model.

These need a built model and its base network (the fits only see tensors):

- :func:`weight_fidelity`: the weight metrics of ``mimicry_report``, recomputed from the model's
  current banks and ``base`` coefficients (so a changed template shows at once);
- :func:`feature_fidelity`: per-block output cosine and top-1 agreement of the logits on images;
- :func:`refine_with_data`: trains the templates and the ``base`` task's coefficients so that block
  outputs match the original model's on unlabeled images (useful when ``n < layers per group``);
- :func:`fidelity_record` / :func:`write_fidelity`: the report ``recast mimic`` writes.

All blocks are named as in the base network: a generated layer's block is its name up to its last
numeric part (``blocks.3.mlp.fc1`` -> ``blocks.3``, ``layer2.1.conv1`` -> ``layer2.1``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recast.config import RecastConfig
from recast.errors import ConfigError, TaskError
from recast.io import atomic_write_json
from recast.mimicry.optimise import optimise
from recast.mimicry.problem import FitProblem, FitResult, fidelity
from recast.surgery import BankPlan

FIDELITY_FILE = "fidelity.json"


class MimicModel(Protocol):
    """What these tools need of a built model; ``recast.RecastModel`` provides it.

    A Protocol rather than an import because ``recast.model`` imports this package.
    """

    net: nn.Module
    plans: list[BankPlan]
    banks: Mapping[str, Any]  # key -> TemplateBank (``templates`` ``(n, *shape)``)
    config: RecastConfig
    tasks: Mapping[str, Any]
    active_task: str | None
    training: bool
    mimicry_report: dict[str, Any]

    def set_task(self, name: str) -> None: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def effective_coefficients(self) -> int: ...


def block_of(name: str) -> str:
    """The block a module belongs to: its name up to the last numeric part (or the name itself)."""
    parts = name.split(".")
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[: numeric[-1] + 1]) if numeric else name


def generated_blocks(model: MimicModel) -> list[str]:
    """The blocks holding generated layers, in module order."""
    layers = {name for plan in model.plans for name in plan.layers}
    blocks: dict[str, None] = {}
    for name, _ in model.net.named_modules():
        if name in layers:
            blocks[block_of(name)] = None
    return list(blocks)


def _problems_and_results(model: MimicModel, base: nn.Module, task: str) -> tuple[list[FitProblem], list[FitResult]]:
    """The fit problems of ``model``'s banks (targets from ``base``) and the model's current fit."""
    problems, results = [], []
    for plan in model.plans:
        targets = torch.stack([base.get_submodule(name).weight.detach() for name in plan.layers])  # (L, *shape)
        coefficients = torch.stack([model.net.get_submodule(name).coefficients(task).detach() for name in plan.layers])
        problems.append(FitProblem(plan.key, plan.role, plan.layers, targets, plan.templates, model.config.coef_sets))
        results.append(FitResult(model.banks[plan.key].templates.detach(), coefficients))  # (n, *shape), (L, K, n)
    return problems, results


def weight_fidelity(model: MimicModel, base: nn.Module, task: str = "base") -> dict[str, Any]:
    """``fidelity`` of ``model``'s generated weights for ``task`` against ``base``'s weights, now."""
    return fidelity(*_problems_and_results(model, base, task))


@contextlib.contextmanager
def _base_task_eval(model: MimicModel, base: nn.Module) -> Iterator[None]:
    """Task ``base`` active and both networks in eval mode; restores both afterwards."""
    if "base" not in model.tasks:
        raise TaskError("the model has no task 'base' (the original head); fidelity compares against it")
    active, modes = model.active_task, (model.training, base.training)
    model.set_task("base")
    model.eval()
    base.eval()
    try:
        yield
    finally:
        model.train(modes[0])
        base.train(modes[1])
        if active is not None:
            model.set_task(active)


@contextlib.contextmanager
def _capture(net: nn.Module, names: list[str], store: dict[str, Tensor]) -> Iterator[None]:
    """Record the outputs of the named modules into ``store`` while the context is open."""

    def hook(name: str):
        def save(_module: nn.Module, _inputs: Any, output: Any) -> None:
            store[name] = output[0] if isinstance(output, tuple | list) else output
        return save

    handles = [net.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _forward_features(net: nn.Module, names: list[str], images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Block outputs and logits of ``net`` on ``images``."""
    store: dict[str, Tensor] = {}
    with _capture(net, names, store):
        logits = net(images)
    return store, logits


def feature_fidelity(model: MimicModel, base: nn.Module, images: Tensor, *, batch_size: int = 32) -> dict[str, Any]:
    """Agreement of the rebuilt model (task ``base``) with the original on ``images`` ``(N, C, H, W)``.

    Returns ``feature_cosine`` (block -> mean over images of the cosine of flattened block outputs),
    ``feature_cosine_min``/``_mean`` over blocks, ``top1_agreement`` (fraction of images whose
    arg-max logit is the same), ``logit_cosine``, ``images`` and ``seconds``.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ConfigError(f"images must be a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    start = time.perf_counter()
    blocks = generated_blocks(model)
    cos_sum = dict.fromkeys(blocks, 0.0)
    agree, logit_cos = 0.0, 0.0
    with _base_task_eval(model, base), torch.no_grad():
        for batch in images.split(batch_size):
            ref, ref_logits = _forward_features(base, blocks, batch)
            out, logits = _forward_features(model.net, blocks, batch)
            for name in blocks:
                cos = F.cosine_similarity(out[name].flatten(1), ref[name].flatten(1), dim=1)  # (B,)
                cos_sum[name] += cos.sum().item()
            agree += (logits.argmax(-1) == ref_logits.argmax(-1)).sum().item()
            logit_cos += F.cosine_similarity(logits.flatten(1), ref_logits.flatten(1), dim=1).sum().item()
    count = images.shape[0]
    cosines = {name: value / count for name, value in cos_sum.items()}
    return {
        "feature_cosine": cosines,
        "feature_cosine_min": min(cosines.values()),
        "feature_cosine_mean": sum(cosines.values()) / len(cosines),
        "top1_agreement": agree / count,
        "logit_cosine": logit_cos / count,
        "images": count,
        "seconds": time.perf_counter() - start,
    }


def _feature_loss(out: dict[str, Tensor], ref: dict[str, Tensor]) -> Tensor:
    """Sum over blocks of the MSE between outputs, each divided by the reference's mean square."""
    loss = torch.zeros(())
    for name, target in ref.items():
        loss = loss + F.mse_loss(out[name], target) / target.pow(2).mean().clamp_min(1e-12)
    return loss


def refine_with_data(
    model: MimicModel,
    base: nn.Module,
    images: Tensor,
    *,
    steps: int = 100,
    lr: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Data-driven refinement: fit templates + ``base`` coefficients to the original's block outputs.

    Adam on the normalised feature MSE of every block with generated layers, mini-batches of
    ``images`` ``(N, C, H, W)`` (no labels), best-loss state kept. The refined ``base`` coefficients
    also become the ``mimicry`` start values of future tasks. Must run before other tasks are added
    (it changes the shared templates). Updates ``model.mimicry_report`` (weight metrics and a
    ``refine`` entry) and returns the ``refine`` entry.
    """
    if set(model.tasks) != {"base"}:
        raise TaskError("refine_with_data changes the shared templates: run it before adding tasks (only 'base' may exist)")
    if images.dim() != 4 or images.shape[0] == 0 or steps < 0 or lr <= 0 or batch_size < 1:
        raise ConfigError("refine_with_data needs (N, C, H, W) images, steps >= 0, lr > 0 and batch_size >= 1")
    start = time.perf_counter()
    blocks = generated_blocks(model)
    layers = [model.net.get_submodule(name) for plan in model.plans for name in plan.layers]
    templates = [bank.templates for bank in model.banks.values()]
    coefficients = [model.coefficient_table.per_task["base"]]  # every layer's slice of task base
    generator = torch.Generator().manual_seed(seed)
    with _base_task_eval(model, base), _trainable(templates + coefficients):

        def objective() -> tuple[Tensor, float]:
            index = torch.randperm(images.shape[0], generator=generator)[:batch_size]
            batch = images[index]
            with torch.no_grad():
                ref, _ = _forward_features(base, blocks, batch)
            out, _ = _forward_features(model.net, blocks, batch)
            loss = _feature_loss(out, ref)
            return loss, loss.item()

        optimiser = torch.optim.Adam(templates + coefficients, lr=lr)
        losses = optimise(
            templates + coefficients, objective, optimiser, None, steps=steps, clip=1.0, progress=progress,
            desc="mimicry (refine on data)",
        )
    with torch.no_grad():
        for layer in layers:
            layer.mimicry.copy_(layer.coefficients("base"))
    entry = {"steps": steps, "lr": lr, "batch_size": batch_size, "images": int(images.shape[0]),
             "seconds": time.perf_counter() - start,
             "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}
    model.mimicry_report.update(weight_fidelity(model, base))
    model.mimicry_report["refine"] = entry
    return entry


@contextlib.contextmanager
def _trainable(params: list[Tensor]) -> Iterator[None]:
    """Make ``params`` require grad for the duration; restore their flags afterwards."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def fidelity_record(model: MimicModel, base: nn.Module, images: Tensor | None = None) -> dict[str, Any]:
    """The model's ``mimicry_report`` with feature fidelity on ``images`` (if given), config and coefficient count."""
    record = dict(model.mimicry_report)
    if images is not None:
        record["features"] = feature_fidelity(model, base, images)
    record["config"] = model.config.to_dict()
    record["effective_coefficients"] = model.effective_coefficients()
    return record


def write_fidelity(directory: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``directory/fidelity.json`` (atomically); returns the path."""
    path = Path(directory) / FIDELITY_FILE
    atomic_write_json(path, record)
    return path


def fidelity_summary(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without its per-layer and per-block entries (what a terminal shows)."""
    summary = {k: v for k, v in record.items() if k not in ("layers", "features")}
    if "features" in record:
        summary["features"] = {k: v for k, v in record["features"].items() if k != "feature_cosine"}
    return summary
