"""LoRA and VeRA through PEFT, and full fine-tuning: counts as PEFT reports them, task isolation, files."""

from __future__ import annotations

import pytest
import timm
import torch

from helpers import tiny_vit
from recast.baselines import FullFineTune, PeftTasks, load_baseline
from recast.errors import FileFormatError, TaskError

pytestmark = pytest.mark.filterwarnings("ignore:Specified to not:UserWarning")


@pytest.mark.parametrize(("method", "expected"), [("lora", 12 * 8 * (384 + 1152)), ("vera", 12 * (1152 + 256))])
def test_counts_equal_peft_on_vit_small(method: str, expected: int) -> None:
    model = PeftTasks(timm.create_model("vit_small_patch16_224", pretrained=False), method)
    assert model.task_parameters("base")["adapter"] == model.peft_trainable_count() == expected


def test_peft_tasks_keep_their_own_adapters(tmp_path) -> None:
    x = torch.randn(4, 3, 16, 16)
    model = PeftTasks(tiny_vit(depth=2), "lora", rank=2)
    with torch.no_grad():
        base_out = model(x)
    model.add_task("a", 3)
    model.set_task("a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("task__a" in n or n.endswith(("head.per_task.weight.a", "head.per_task.bias.a")) for n in trainable)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        out_a = model(x)
        model.set_task("base")
        assert torch.equal(model(x), base_out)
    model.save_pretrained(tmp_path)
    loaded = load_baseline(tmp_path)
    loaded.set_task("a")
    with torch.no_grad():
        assert torch.equal(loaded(x), out_a)
    groups = loaded.param_groups(1e-3)
    assert [g["name"] for g in groups] == ["adapter", "head"]


def test_full_fine_tune_tasks_are_separate(tmp_path) -> None:
    x = torch.randn(4, 3, 16, 16)
    model = FullFineTune(tiny_vit(depth=2))
    model.add_task("a", 2)
    model.set_task("a")
    n_backbone = model.task_parameters("a")["backbone"]
    assert n_backbone == sum(t.numel() for t in model.pretrained.values() if t.is_floating_point())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
        out_a = model(x)
    model.add_task("b", 2)
    model.set_task("b")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.sub_(0.02)
        model.set_task("a")
        assert torch.equal(model(x), out_a)
    record = model.save_task(tmp_path, "a")
    assert record["bytes"] > 4 * n_backbone
    model.delete_task("a")
    model.load_task(tmp_path, "a")
    model.set_task("a")
    with torch.no_grad():
        assert torch.equal(model(x), out_a)


def test_task_file_for_another_backbone_is_refused(tmp_path) -> None:
    model = PeftTasks(tiny_vit(depth=2, seed=0), "vera", rank=4)
    model.save_task(tmp_path, "base")
    other = PeftTasks(tiny_vit(depth=2, seed=1), "vera", rank=4)
    with pytest.raises(FileFormatError, match="another backbone"):
        other.load_task(tmp_path, "base", replace=True)
    with pytest.raises(TaskError, match="already loaded"):
        model.load_task(tmp_path, "base")
