"""``RecastModel.from_base(..., inplace=True)``: the base becomes the model's network, nothing is copied."""

import pytest
import torch

from helpers import narrow_resnet, tiny_vit
from recast import RecastConfig, RecastModel
from recast.errors import ConfigError


@pytest.mark.parametrize("make, target, size", [(tiny_vit, "att+mlp", 16), (narrow_resnet, "conv", 32)])
def test_inplace_builds_the_same_model_without_a_copy(make, target, size):
    images = torch.randn(2, 3, size, size)
    copied = RecastModel.from_base(make(), RecastConfig(target=target, groups=1)).eval()
    base = make()
    kept = {name: p for name, p in base.named_parameters()}
    model = RecastModel.from_base(base, RecastConfig(target=target, groups=1), inplace=True).eval()
    assert model.net is base
    # The layers it does not generate keep the very tensors the base held: no second copy.
    net_params = dict(model.net.named_parameters())
    untouched = [n for n in kept if n in net_params and "qkv" not in n and "fc" not in n and "conv" not in n]
    assert untouched and all(net_params[n].data_ptr() == kept[n].data_ptr() for n in untouched)
    with torch.no_grad():
        torch.testing.assert_close(model(images), copied(images))
    assert model.mimicry_report["original_bytes"] == copied.mimicry_report["original_bytes"]
    assert model.recipe == copied.recipe


def test_inplace_refuses_refinement_against_the_consumed_base():
    base = tiny_vit()
    with pytest.raises(ConfigError, match="inplace=False"):
        RecastModel.from_base(base, RecastConfig(target="att", groups=1), inplace=True,
                              refine_images=torch.randn(2, 3, 16, 16))
    assert isinstance(base.blocks[0].attn.qkv, torch.nn.Linear)  # refused before anything changed
