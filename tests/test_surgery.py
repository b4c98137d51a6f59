import pytest
import timm
import torch
import torchvision
from torch import nn

from recast import ConfigError, RecastConfig, RecastModel, SurgeryError
from recast.layers import GeneratedConv2d, GeneratedLinear
from recast.surgery import plan_banks, role_of
from tests.helpers import tiny_resnet, tiny_vit


@pytest.fixture(scope="module")
def vit_small():
    return timm.create_model("vit_small_patch16_224", pretrained=False).eval()


@pytest.mark.parametrize(("target", "count"), [("att", 48), ("mlp", 96), ("att+mlp", 144)])
def test_vit_small_default_counts(vit_small, target, count):
    model = RecastModel.from_base(vit_small, RecastConfig(target=target))
    model.add_task("t", num_classes=10)
    assert model.task_parameters("t") == {"coefficients": count, "head": 3850, "other": 0}
    assert model.effective_coefficients() == count // 2  # K=2 sets averaged


@pytest.mark.parametrize(("name", "count"), [("resnet18", 16), ("resnet34", 168)])
def test_timm_resnet_counts(name, count):
    model = RecastModel.from_base(timm.create_model(name), RecastConfig(target="conv"))
    assert model.task_parameters("base")["coefficients"] == count


def test_torchvision_resnets_basic_and_bottleneck():
    r18 = RecastModel.from_base(torchvision.models.resnet18(weights=None), RecastConfig(target="conv"))
    assert r18.task_parameters("base")["coefficients"] == 16
    r50 = RecastModel.from_base(torchvision.models.resnet50(weights=None), RecastConfig(target="conv"))
    # Bottleneck: conv1, conv2, conv3 of blocks 1.. of stages [3, 4, 6, 3]; n = blocks - 1, K = 2.
    assert r50.task_parameters("base")["coefficients"] == sum(3 * (b - 1) * (b - 1) * 2 for b in (3, 4, 6, 3))


def test_first_block_and_downsample_stay_plain():
    model = RecastModel.from_base(tiny_resnet("resnet18"), RecastConfig(target="conv"))
    modules = dict(model.net.named_modules())
    assert isinstance(modules["layer2.0.conv1"], nn.Conv2d)
    assert isinstance(modules["layer2.0.downsample.0"], nn.Conv2d)
    assert isinstance(modules["conv1"], nn.Conv2d)
    assert isinstance(modules["layer2.1.conv2"], GeneratedConv2d)


def test_layers_of_a_group_share_one_bank_object():
    model = RecastModel.from_base(tiny_vit(depth=4), RecastConfig(target="att", groups=2))
    qkv = [model.net.blocks[i].attn.qkv for i in range(4)]
    assert all(isinstance(layer, GeneratedLinear) for layer in qkv)
    assert qkv[0].bank is qkv[1].bank is model.banks["blocks_attn_qkv__g0"]
    assert qkv[2].bank is qkv[3].bank is not qkv[0].bank
    assert qkv[0].bank.templates.data_ptr() == qkv[1].bank.templates.data_ptr()
    # stored once: the backbone file holds each bank a single time, layers hold none
    keys = model.backbone_tensors().keys()
    assert sum(k.startswith("banks.") for k in keys) == 2
    assert not any("qkv.weight" in k for k in keys)


def test_patterns_group_by_role_and_shape():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                                        nn.Conv2d(8, 8, 3, padding=1)])
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            for conv in self.convs:
                x = torch.relu(conv(x))
            return self.fc(x.mean((2, 3)))

    plans = plan_banks(Net(), RecastConfig(target=["convs.*"]))
    assert [(p.layers, p.templates) for p in plans] == [(("convs.0",), 1), (("convs.1", "convs.2"), 2)]
    assert len({p.key for p in plans}) == 2
    net = Net().eval()
    model = RecastModel.from_base(net, RecastConfig(target=["convs.*"]))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=1e-5, atol=1e-6)


def test_role_names():
    assert role_of("blocks.11.attn.qkv") == "blocks.*.attn.qkv"
    assert role_of("layer3.4.conv2") == "layer3.*.conv2"


def test_no_match_lists_candidates():
    with pytest.raises(SurgeryError, match=r"target 'att' matches no Linear or Conv2d module of this ResNet\. Candidate names: conv1, layer1\.\*\.conv1 \(2\)"):
        RecastModel.from_base(tiny_resnet("resnet18"), RecastConfig(target="att"))
    with pytest.raises(SurgeryError, match=r"blocks\.\*\.attn\.qkv \(2\)"):
        RecastModel.from_base(tiny_vit(depth=2), RecastConfig(target=["nothing.*"]))


def test_groups_must_divide_the_depth():
    with pytest.raises(ConfigError, match=r"groups=6 does not divide the 4 layers of blocks\.\*\.attn\.qkv; allowed values: \[1, 2, 4\]"):
        RecastModel.from_base(tiny_vit(depth=4), RecastConfig(target="att"))


def test_layers_with_their_own_forward_are_refused():
    from timm.layers import Conv2dSame

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Conv2dSame(4, 4, 3, stride=2), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(SurgeryError, match=r"1 is a Conv2dSame, whose forward differs from Conv2d's"):
        plan_banks(net, RecastConfig(target=["*"], exclude=("3",)))
    assert [p.layers for p in plan_banks(net, RecastConfig(target=["0"]))] == [("0",)]
