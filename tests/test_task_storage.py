"""Compact per-task state: one coefficient tensor per task, heads as tensors, bounded weight cache."""

from __future__ import annotations

import pytest
import torch

from recast import RecastConfig, RecastModel
from recast.layers import GeneratedWeight
from recast.serve.memory import _libc, per_task_figures, settled_reading
from tests.helpers import narrow_resnet, tiny_vit


def _vit_model() -> RecastModel:
    return RecastModel.from_base(tiny_vit(), RecastConfig(target="att", groups=2)).eval()


def test_a_task_adds_three_tensors_and_no_module() -> None:
    model = _vit_model()
    modules, params = len(list(model.modules())), len(list(model.parameters()))
    for i in range(30):
        model.add_task(f"t{i}", 4)
    assert len(list(model.modules())) == modules  # no module per task anywhere
    assert len(list(model.parameters())) == params + 3 * 30  # coefficients, head weight, head bias
    flat = model.coefficient_table.per_task["t7"]
    assert flat.numel() == model.task_parameters("t7")["coefficients"] == 16
    layers = [m for _, m in model.task_modules() if isinstance(m, GeneratedWeight)]
    storage = flat.untyped_storage().data_ptr()
    assert all(layer.coefficients("t7").untyped_storage().data_ptr() == storage for layer in layers)  # views


@pytest.mark.skipif(_libc() is None, reason="needs glibc's mallinfo2 to count allocated bytes")
def test_resident_bytes_per_task_are_close_to_its_numbers() -> None:
    model = _vit_model()
    libc = _libc()
    for i in range(20):  # warm the allocator's small-object pools
        model.add_task(f"w{i}", 10)
    before = settled_reading(libc)
    for i in range(300):
        model.add_task(f"t{i}", 10)
    after = settled_reading(libc)
    resident, allocated = ((after[k] - before[k]) / 300 for k in ("rss", "allocated"))
    numbers = 4 * sum(model.task_parameters("t0").values())  # 16 coefficients + a 10 x 32 head
    assert allocated >= numbers  # the tensors themselves
    assert resident < numbers + 4000  # with a module per task and layer it was ~18 KB here


def test_tasks_named_like_container_methods_train_save_and_load(tmp_path) -> None:
    model = _vit_model()
    x = torch.randn(3, 3, 16, 16)
    for name in ("copy", "keys", "get", "values"):
        model.add_task(name, 3)
        model.set_task(name)
        with torch.no_grad():
            for tensor in model.trainable_parameters():
                tensor.add_(0.1 * torch.randn_like(tensor))
    with torch.no_grad():
        expected = {name: (model.set_task(name), model(x))[1] for name in ("copy", "keys", "get", "values")}
    model.save_pretrained(tmp_path)
    loaded = RecastModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        for name, logits in expected.items():
            loaded.set_task(name)
            assert torch.equal(loaded(x), logits)
            assert all(torch.equal(a, b) for a, b in zip(loaded.task_tensors(name).values(),
                                                         model.task_tensors(name).values(), strict=True))


def test_only_the_active_task_is_trainable_after_many_switches() -> None:
    model = _vit_model()
    for i in range(6):
        model.add_task(f"t{i}", 3)
    for name in ("t1", "t4", "base", "t4", "t0"):
        model.set_task(name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"coefficient_table.per_task.t0", "net.head.per_task.weight.t0", "net.head.per_task.bias.t0"}
    model.delete_task("t0")
    assert not any(p.requires_grad for p in model.parameters())
    model.set_task("t2")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "coefficient_table.per_task.t2", "net.head.per_task.weight.t2", "net.head.per_task.bias.t2"}


def test_composed_weights_are_cached_for_a_few_tasks_only() -> None:
    model = _vit_model()
    names = [f"t{i}" for i in range(8)]
    for name in names:
        model.add_task(name, 3)
        with torch.no_grad():
            model.coefficient_table.per_task[name].add_(0.1 * torch.randn(16))
    x = torch.randn(8, 3, 16, 16)
    layers = [m for _, m in model.task_modules() if isinstance(m, GeneratedWeight)]
    with torch.no_grad():
        mixed = model.forward_tasks(x, names, batching="group")  # composes every task's weights
        for i, name in enumerate(names):
            model.set_task(name)
            assert (model(x[i : i + 1])[0, :3] - mixed[i, :3]).abs().max() < 1e-5
            assert all(len(layer._cache) <= layer.cache_limit and name in layer._cache for layer in layers)
        exported = model.export("t3").eval()(x[3:4])
        model.set_task("t3")
        assert (model(x[3:4]) - exported).abs().max() < 1e-5
    model.delete_task("t3")  # every layer forgets its weight, not only the first to empty the shared table
    assert not any("t3" in layer._cache for layer in layers)


def test_batchnorm_tasks_on_pretrained_statistics_share_one_empty_entry(tmp_path) -> None:
    model = RecastModel.from_base(narrow_resnet(), RecastConfig(target="conv", groups=1, templates=2)).eval()
    model.add_task("a", 3)
    model.add_task("own", 3, own_bn=True)
    model.add_task("copy_of_a", 3, init_from="a")
    bn = next(m for _, m in model.task_modules() if type(m).__name__ == "TaskBatchNorm")
    assert bn.per_task["a"] is bn.per_task["base"] is bn.per_task["copy_of_a"] is bn.no_state
    assert hasattr(bn.per_task["own"], "running_mean")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.set_task("own")
        expected = model(x)
    model.save_pretrained(tmp_path)
    loaded = RecastModel.from_pretrained(tmp_path).eval()
    loaded.set_task("own")
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert model.task_tensors("a").keys() == loaded.task_tensors("a").keys()


def test_per_task_memory_figures_subtract_the_heads() -> None:
    def probe(tasks: int, rss: int, allocated: int) -> dict:
        return {"rows": [{"tasks": tasks, "rss_delta": rss, "allocated_delta": allocated}]}

    figures = per_task_figures({"recast": probe(1000, 18_000_000, 17_000_000),
                                "lora": probe(1000, 700_000_000, 626_000_000),
                                "linear": probe(1000, 16_000_000, 16_000_000)})
    allocated = figures["allocated"]
    assert allocated["with_heads"] == {"recast": 17_000.0, "lora": 626_000.0, "linear": 16_000.0}
    assert allocated["without_heads"] == {"recast": 1_000.0, "lora": 610_000.0}
    assert allocated["lora_over_recast_with_heads"] == pytest.approx(626 / 17)
    assert allocated["lora_over_recast_without_heads"] == pytest.approx(610.0)
    assert figures["rss"]["lora_over_recast_without_heads"] == pytest.approx(684 / 2)


def test_training_through_more_frozen_tasks_than_the_cache_holds() -> None:
    model = _vit_model()
    names = [f"t{i}" for i in range(6)]
    for name in names:
        model.add_task(name, 3)
    layers = [m for _, m in model.task_modules() if isinstance(m, GeneratedWeight)]
    for layer in layers:
        layer.cache_limit = 2
    model.set_task("t0")
    model.train()
    out = model.forward_tasks(torch.randn(6, 3, 16, 16), names, batching="group")
    out[torch.isfinite(out)].sum().backward()  # evicted weights were not overwritten under autograd
    grad = model.coefficient_table.per_task["t0"].grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(len(layer._cache) <= 2 for layer in layers)
