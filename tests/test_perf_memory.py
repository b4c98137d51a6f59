"""Training without keeping composed weights (``recompute_in_backward``): the same outputs and gradients, less memory."""

import pytest
import torch
import torch.nn.functional as F

from helpers import narrow_resnet, tiny_vit
from recast import RecastConfig, RecastModel
from recast.bank import compose, generated_conv2d, generated_linear
from recast.layers import GeneratedWeight


def _grads(output: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed), dtype=output.dtype)
    return list(torch.autograd.grad(output, inputs, upstream))


@pytest.mark.parametrize("batch_shape", [(5,), (2, 7)])
def test_generated_linear_equals_composing_then_linear(batch_shape):
    torch.manual_seed(0)
    x = torch.randn(*batch_shape, 6, requires_grad=True)
    templates = torch.randn(3, 4, 6, requires_grad=True)
    coefficients = torch.randn(2, 3, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    inputs = [x, templates, coefficients, bias]
    expected = F.linear(x, compose(templates, coefficients), bias)
    got = generated_linear(x, templates, coefficients, bias)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(_grads(got, inputs), _grads(expected, inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stride, padding, groups", [((1, 1), (1, 1), 1), ((2, 2), (0, 0), 1), ((1, 1), (1, 1), 2)])
def test_generated_conv2d_equals_composing_then_conv(stride, padding, groups):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    templates = torch.randn(2, 6, 4 // groups, 3, 3, requires_grad=True)
    coefficients = torch.randn(2, 2, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    inputs = [x, templates, coefficients, bias]
    expected = F.conv2d(x, compose(templates, coefficients), bias, stride, padding, (1, 1), groups)
    got = generated_conv2d(x, templates, coefficients, bias, stride, padding, (1, 1), groups)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(_grads(got, inputs), _grads(expected, inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_generated_layers_pass_gradcheck_in_double_precision():
    torch.manual_seed(0)
    t_lin = torch.randn(2, 3, 4, dtype=torch.double, requires_grad=True)
    t_conv = torch.randn(2, 3, 2, 3, 3, dtype=torch.double, requires_grad=True)
    c = torch.randn(2, 2, dtype=torch.double, requires_grad=True)
    x_lin = torch.randn(2, 5, 4, dtype=torch.double, requires_grad=True)
    x_conv = torch.randn(1, 2, 5, 5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t, k: generated_linear(x, t, k, None), (x_lin, t_lin, c))
    assert torch.autograd.gradcheck(
        lambda x, t, k: generated_conv2d(x, t, k, None, (1, 1), (1, 1), (1, 1), 1), (x_conv, t_conv, c)
    )


def _coefficient_grads(model: RecastModel, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def _composed_weights_kept(model: RecastModel, images: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """Coefficient gradients of one step, and how many composed weights autograd kept for backward."""
    shapes = {tuple(b.templates.shape[1:]) for b in model.banks.values()}
    shapes |= {s[::-1] for s in shapes if len(s) == 2}  # a linear layer keeps its weight transposed
    kept = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.grad_fn is not None and tuple(tensor.shape) in shapes:
            kept.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        grads = _coefficient_grads(model, images, labels)
    return grads, len(kept)


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_recompute_in_backward_gives_the_default_paths_gradients_and_keeps_no_weight(kind, monkeypatch):
    if kind == "vit":
        base, config, images = tiny_vit(depth=4), RecastConfig(target="att+mlp", groups=2), torch.randn(3, 3, 16, 16)
    else:
        base, config, images = narrow_resnet(), RecastConfig(target="conv"), torch.randn(2, 3, 32, 32)
    model = RecastModel.from_base(base, config)
    model.add_task("t", 4)
    model.set_task("t")
    model.train()
    labels = torch.tensor([0, 3, 1][: images.shape[0]])
    with monkeypatch.context() as patch:
        patch.setattr(GeneratedWeight, "recompute_in_backward", True)
        new, new_kept = _composed_weights_kept(model, images, labels)
    old, old_kept = _composed_weights_kept(model, images, labels)  # the default keeps the composed weights
    assert new.keys() == old.keys() and any("coefficient" in name for name in new)
    for name in new:
        torch.testing.assert_close(new[name], old[name], rtol=1e-5, atol=1e-6)
    assert old_kept > 0 and new_kept == 0  # composing then the plain layer kept every weight; now none


def test_generated_layers_train_under_autocast():
    torch.manual_seed(0)
    templates = torch.randn(2, 6, 4, 3, 3)
    coefficients = torch.randn(2, 2, requires_grad=True)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generated_conv2d(x, templates, coefficients, None, (1, 1), (1, 1), (1, 1), 1)
        out = generated_linear(out.flatten(1), torch.randn(2, 3, out[0].numel()), coefficients, None)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert x.grad.dtype == torch.float32 and coefficients.grad.dtype == torch.float32
    assert torch.isfinite(coefficients.grad).all() and coefficients.grad.abs().sum() > 0
