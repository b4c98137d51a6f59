"""Every method of the registry: it trains, reloads exactly, and never changes an earlier task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import narrow_resnet, tiny_resnet, tiny_vit
from recast.errors import ConfigError
from recast.methods import METHOD_NAMES, build_method, load_method, methods_for

pytestmark = pytest.mark.filterwarnings("ignore:Specified to not:UserWarning")
RESNET_ONLY = {"clr", "recast+clr", "recast+piggyback"}


def setup(method: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The method on a tiny backbone, and a small separable two-class batch (sign of the red mean)."""
    if method in RESNET_ONLY:
        base, x = narrow_resnet(), torch.randn(4, 3, 32, 32)
    else:
        base, x = tiny_vit(depth=2), torch.randn(16, 3, 16, 16)
    options = {"groups": 1} if method in ("recast", "recast+melo", "recast+adaptformer") else {}
    y = (x[:, 0].mean((1, 2)) > 0).long()
    return build_method(method, base, **options), x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 20) -> list[float]:
    """A minimal AdamW loop over one batch, with the method's own parameter groups."""
    optimizer = torch.optim.AdamW(model.param_groups(1e-2), lr=1e-2, weight_decay=1e-6)
    model.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_trains_reloads_and_keeps_earlier_tasks(method: str, tmp_path) -> None:
    torch.manual_seed(0)
    model, x, y = setup(method)
    model.add_task("a", 2)
    model.set_task("a")
    steps = 6 if method in RESNET_ONLY else 20
    losses = train(model, x, y, steps)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        out_a = model(x)
    model.add_task("b", 2)
    model.set_task("b")
    train(model, x, 1 - y, steps=3)
    model.eval()
    with torch.no_grad():
        out_b = model(x)
        model.set_task("a")
        assert torch.equal(model(x), out_a), "training task b changed task a"
    record = model.save_task(tmp_path, "a")
    assert record["method"] == method and "lrs" in record["method_options"]
    model.save_pretrained(tmp_path)
    loaded = load_method(tmp_path).eval()
    with torch.no_grad():
        loaded.set_task("a")
        assert torch.equal(loaded(x), out_a)
        loaded.set_task("b")
        assert torch.equal(loaded(x), out_b)
    assert loaded.task_parameters("b") == model.task_parameters("b")


def test_param_groups_have_their_own_learning_rates() -> None:
    model = build_method("recast+piggyback", tiny_resnet(), mask_lr=1e-4, head_lr=1e-3, coef_lr=2e-3)
    model.add_task("t", 2)
    model.set_task("t")
    groups = {g["name"]: g for g in model.param_groups(5e-3)}
    assert {k: g["lr"] for k, g in groups.items()} == {"coefficients": 2e-3, "adapter": 1e-4, "head": 1e-3}
    assert groups["adapter"]["weight_decay"] == 0.0
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups.values() for p in g["params"]}


def test_methods_that_fit() -> None:
    assert methods_for(tiny_vit(depth=2)) == [
        "recast", "adaptformer", "recast+adaptformer", "melo", "recast+melo", "piggyback", "lora", "vera",
        "linear", "full",
    ]
    with pytest.raises(ConfigError, match="methods that fit it: recast, clr, recast\\+clr, piggyback"):
        build_method("melo", tiny_resnet())
    with pytest.raises(ConfigError, match="unknown method"):
        build_method("prompt", tiny_vit(depth=2))
