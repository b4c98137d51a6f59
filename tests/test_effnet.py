"""EfficientNet-Lite as RECAST backbones: the conv preset, coefficient counts, LoRA targets, own BatchNorm.

The networks are built with random weights here (loading the packaged weights is tested in
test_backbones.py); EfficientNets take any input size, so 32-64 px keeps the tests fast.
"""

import re

import pytest
import timm
import torch

from recast import ConfigError, RecastConfig, RecastModel
from recast.adapters.base import architecture
from recast.bench.suites import effnet_suite
from recast.methods import build_method, load_method, methods_for
from recast.surgery import plan_banks, pointwise_convs, role_of
from tests.helpers import randomise_batchnorm, tiny_resnet, tiny_vit


def lite(index: int = 0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = timm.create_model(f"tf_efficientnet_lite{index}", num_classes=5).eval()
    randomise_batchnorm(net)
    return net


@pytest.fixture(scope="module")
def lite0():
    return lite(0)


# Per-task coefficients with the defaults (pointwise convs, one bank per stage and role with as many
# templates as its layers, K=2 sets): each stage with m non-first blocks costs 2 roles * m layers *
# m templates * 2 = 4 m^2. Lite0 stages have 1, 2, 2, 3, 3, 4, 1 blocks; Lite1/2 have 1, 3, 3, 4, 4, 5, 1.
@pytest.mark.parametrize(("index", "coefficients", "with_depthwise"), [(0, 76, 114), (1, 168, 252), (2, 168, 252)])
def test_per_task_coefficient_counts(index, coefficients, with_depthwise):
    net = lite(index)
    model = RecastModel.from_base(net, RecastConfig(target="conv"))
    model.add_task("t", num_classes=10)
    assert model.task_parameters("t")["coefficients"] == coefficients
    assert coefficients <= 200 or index > 0  # the Lite0 budget of the issue
    deeper = RecastModel.from_base(net, RecastConfig(target="conv", depthwise=True))
    assert deeper.task_parameters("base")["coefficients"] == with_depthwise


def test_one_bank_per_stage_and_role_without_first_blocks(lite0):
    plans = plan_banks(lite0, RecastConfig(target="conv", depthwise=True))
    for plan in plans:
        stages = {name.split(".")[1] for name in plan.layers}
        blocks = [int(name.split(".")[2]) for name in plan.layers]
        assert len(stages) == 1 and 0 not in blocks
        assert re.fullmatch(r"blocks\.\d\.\*\.conv_(pw|pwl|dw)", plan.role)
    # stages 1-5 have non-first blocks, three roles each
    assert len(plans) == 5 * 3
    assert role_of("blocks.3.2.conv_pw") == "blocks.3.*.conv_pw"
    assert role_of("blocks.3.attn.qkv") == "blocks.*.attn.qkv"


def test_recast_on_effnet_is_exact_and_trains_only_coefficients(lite0):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = lite0(x)
    model = build_method("recast", lite0)
    assert model.method_options["target"] == "conv"
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-4, rtol=1e-4)


def test_architecture_names_each_family(lite0):
    assert architecture(lite0) == "effnet"
    assert architecture(tiny_vit(depth=2)) == "vit"
    assert architecture(tiny_resnet()) == "resnet"
    assert architecture(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))) == "other"
    fits = methods_for(lite0)
    assert {"recast", "linear", "lora", "full", "piggyback", "recast+piggyback"} <= set(fits)
    assert "melo" not in fits and "adaptformer" not in fits
    assert "lora" in methods_for(tiny_vit(depth=2)) and "recast" in methods_for(tiny_resnet())


def test_lora_targets_the_pointwise_convs(lite0):
    names = pointwise_convs(lite0)
    assert len(names) == 2 * 15 + 1  # 16 blocks; the first (depthwise-separable) has conv_pw only
    assert all(n.endswith((".conv_pw", ".conv_pwl")) for n in names)
    model = build_method("lora", lite0, rank=2)
    assert model.recorded_options()["targets"] == names
    model.add_task("t", num_classes=3)
    model.set_task("t")
    adapter = model.task_parameters("t")["adapter"]
    assert adapter == sum(2 * (m.in_channels + m.out_channels) for n, m in lite0.named_modules() if n in names)


def test_own_bn_method_option_keeps_statistics_per_task(lite0, tmp_path):
    x = torch.randn(4, 3, 32, 32)
    model = build_method("recast", lite0, own_bn=True)
    with torch.no_grad():
        before = model(x)
    model.add_task("t", num_classes=3, own_bn=False)  # the method option wins
    model.set_task("t")
    channels = sum(2 * m.num_features for m in lite0.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert model.task_parameters("t")["other"] == channels
    model.train()
    model(torch.randn(8, 3, 32, 32) * 3 + 1)  # batch statistics update this task's running stats only
    model.eval()
    model.set_task("base")
    with torch.no_grad():
        assert torch.equal(model(x), before)
    model.save_pretrained(tmp_path)
    loaded = load_method(tmp_path)
    assert loaded.method_options["own_bn"] is True and loaded.tasks["t"].own_bn
    with pytest.raises(ConfigError, match="own_bn must be true or false"):
        build_method("recast", lite0, own_bn="yes")
    with pytest.raises(ConfigError, match="needs BatchNorm"):
        build_method("linear", tiny_vit(depth=2), own_bn=True)


def test_effnet_suite_names_its_recast_variants():
    (backbone,) = effnet_suite().backbones
    assert {"recast", "recast:dw", "recast:bn"} <= set(backbone.methods)
    assert backbone.options["recast:dw"] == {"depthwise": True} and backbone.options["recast:bn"] == {"own_bn": True}


@pytest.mark.parametrize("method", ["piggyback", "recast+piggyback"])
def test_piggyback_masks_same_padded_convs_faithfully(lite0, method):
    # tf_efficientnet_lite's stem and stride-2 depthwise convs are timm Conv2dSame, padded at run time
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected = lite0(x)
    model = build_method(method, lite0, scope="all")
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-4, rtol=1e-4)  # masks start full: the base itself
