"""Mixed-task batches: the template-space path and grouping both equal per-task forwards."""

from __future__ import annotations

import pytest
import torch

from recast import RecastConfig, RecastModel
from recast.errors import TaskError
from recast.layers import GeneratedLinear, prefer_templates
from recast.tasks import Routing
from tests.helpers import narrow_resnet, tiny_vit

TASKS = ("a", "b", "c")


def _model(base: torch.nn.Module, target: str) -> RecastModel:
    config = RecastConfig(target=target, groups=1, templates=2) if target == "conv" else RecastConfig(target=target, groups=2)
    model = RecastModel.from_base(base, config).eval()
    generator = torch.Generator().manual_seed(7)
    for number, name in enumerate(TASKS):
        model.add_task(name, 3 + 2 * number)
        for _, module in model.task_modules():
            for tensor in module.parameters_of(name):
                with torch.no_grad():
                    tensor.add_(0.3 * torch.randn(tensor.shape, generator=generator))
    return model


def _per_task(model: RecastModel, x: torch.Tensor, tasks: list[str]) -> list[torch.Tensor]:
    rows = []
    for i, task in enumerate(tasks):
        model.set_task(task)
        rows.append(model(x[i : i + 1])[0])
    return rows


@pytest.mark.parametrize("kind", ["vit", "resnet"])
@pytest.mark.parametrize("batching", ["template", "group", "auto"])
def test_mixed_forward_equals_per_task_forwards(kind: str, batching: str, one_thread) -> None:
    base, target, size = (tiny_vit(), "att+mlp", 16) if kind == "vit" else (narrow_resnet(), "conv", 32)
    model = _model(base, target)
    x = torch.randn(7, 3, size, size, generator=torch.Generator().manual_seed(1))
    tasks = ["b", "a", "c", "c", "a", "b", "b"]
    with torch.no_grad():
        mixed = model.forward_tasks(x, tasks, batching=batching)
        singles = _per_task(model, x, tasks)
    assert mixed.shape == (7, 7)
    for i, single in enumerate(singles):
        assert (mixed[i, : single.shape[0]] - single).abs().max().item() < 1e-5
        assert torch.isinf(mixed[i, single.shape[0]:]).all()


def test_template_path_is_taken_and_differentiable(one_thread) -> None:
    model = _model(tiny_vit(), "att")
    layer = next(m for _, m in model.task_modules() if isinstance(m, GeneratedLinear))
    calls = []
    original = layer.forward_templates
    layer.forward_templates = lambda x, mix: calls.append(mix.shape) or original(x, mix)
    x = torch.randn(4, 3, 16, 16)
    model.set_task("a")
    out = model.forward_tasks(x, ["a", "b", "a", "c"], batching="template")
    out[torch.isfinite(out)].sum().backward()
    assert calls == [(4, layer.bank.size)]
    grads = [model.coefficient_table.per_task[t].grad for t in TASKS]
    assert grads[0] is not None and grads[0].abs().sum() > 0  # the active task's coefficients learn


def test_single_task_batch_and_bad_mode(one_thread) -> None:
    model = _model(tiny_vit(), "att")
    x = torch.randn(3, 3, 16, 16)
    model.set_task("b")
    with torch.no_grad():
        assert torch.equal(model.forward_tasks(x, ["b"] * 3, batching="template"), model(x))
    with pytest.raises(TaskError, match="batching"):
        model.forward_tasks(x, ["a", "b", "c"], batching="fastest")
    with pytest.raises(TaskError, match="no task named"):
        model.forward_tasks(x, ["a", "b", "zz"])


def test_cost_model_prefers_grouping_for_few_tasks_and_templates_for_many() -> None:
    # a ViT-S qkv on 32 single-image rows (tiny inputs): 32 groups cost more than 2 dense products
    dense, numel, weight = 32 * 384 * 1152, 32 * 384, 384 * 1152
    assert not prefer_templates(dense, numel, 2, 1, 0, weight, "cpu")
    assert not prefer_templates(dense, numel, 2, 2, 0, weight, "cpu")
    assert prefer_templates(dense, numel, 2, 32, 0, weight, "cpu")
    # with 197 tokens per image the extra template products cost more than the groups on a CPU
    assert not prefer_templates(197 * dense, 197 * numel, 2, 32, 0, weight, "cpu")
    assert prefer_templates(197 * dense, 197 * numel, 2, 32, 0, weight, "cuda")


def test_routing_groups_and_tuple_compatibility() -> None:
    routing = Routing(["x", "y", "x", "z"])
    assert routing.names == ["x", "y", "z"]
    assert routing.index.tolist() == [0, 1, 0, 2]
    assert [g.tolist() for g in routing.groups] == [[0, 2], [1], [3]]
    names, index = routing
    assert Routing.of((names, index)).groups[0].tolist() == [0, 2]
