"""Adapters: counts, identity at the start, export and routing equal the forward, files, bad input."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from helpers import narrow_resnet, tiny_resnet, tiny_vit
from recast import RecastConfig, RecastModel
from recast.adapters import adaptformer
from recast.adapters.piggyback import pack_bits, unpack_bits
from recast.errors import ConfigError
from recast.format import ModelStore
from recast.methods import build_method, load_method

VIT_CASES = [("melo", "none"), ("melo", "mlp"), ("adaptformer", "none"), ("adaptformer", "att"), ("piggyback", "none")]
RESNET_CASES = [("clr", "none"), ("clr", "conv"), ("piggyback", "conv")]


def build(kind: str, target: str) -> tuple[RecastModel, torch.Tensor]:
    """A tiny model with RECAST target ``target`` and adapter ``kind``, and an input batch for it."""
    vit = kind in ("melo", "adaptformer") or (kind, target) in VIT_CASES
    base = tiny_vit(depth=2) if vit else tiny_resnet()
    groups = 1 if target in ("mlp", "att") else None
    model = RecastModel.from_base(base, RecastConfig(target=target, groups=groups))
    torch.manual_seed(1)
    x = torch.randn(4, 3, 16, 16) if vit else torch.randn(2, 3, 32, 32)
    return model, x


def perturb(model: RecastModel, task: str) -> None:
    """Move every per-task tensor of ``task`` away from its start (masks: drop about a third)."""
    torch.manual_seed(2)
    with torch.no_grad():
        for _, module in model.task_modules():
            for key, p in module.per_task[task].named_parameters():
                if key == "mask":
                    p.copy_(torch.where(torch.rand_like(p) < 0.3, torch.zeros_like(p), p))
                else:
                    p.add_(0.1 * torch.randn_like(p))


PRESET_CASES = [("adaptformer", "none", adaptformer.REFERENCE), ("adaptformer", "att", adaptformer.REFERENCE),
                ("adaptformer", "mlp", {"input": "pre_norm", "scale": 0.5})]


@pytest.mark.parametrize(("kind", "target", "options"),
                         [(k, t, {}) for k, t in VIT_CASES + RESNET_CASES] + PRESET_CASES)
def test_identity_start_export_routing_and_reload(kind: str, target: str, options: dict, tmp_path) -> None:
    model, x = build(kind, target)
    with torch.no_grad():
        before = model(x)
        model.add_adapter(kind, **options)
        assert torch.equal(model(x), before), "a fresh adapter must not change the output"
    model.add_task("t", 3)
    perturb(model, "t")
    model.set_task("t")
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert not torch.allclose(out[:, :3], before[:, :3])
        exported = model.export("t").eval()(x)
        torch.testing.assert_close(exported, out, rtol=1e-5, atol=1e-5)
        mixed = model.forward_tasks(torch.cat([x, x]), ["t"] * len(x) + ["base"] * len(x))
        torch.testing.assert_close(mixed[: len(x), :3], out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mixed[len(x):], before, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)
    loaded = RecastModel.from_pretrained(tmp_path).eval()
    loaded.set_task("t")
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    assert loaded.task_parameters("t") == model.task_parameters("t")


def test_counts_on_vit_small() -> None:
    vit_s = timm.create_model("vit_small_patch16_224", pretrained=False)
    for kind, expected in (("melo", 18_432), ("adaptformer", 23_064)):
        model = RecastModel.from_base(vit_s, RecastConfig(target="none"))
        model.add_adapter(kind)
        assert model.task_parameters("base")["adapter"] == expected
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected + 384 * 1000 + 1000


def test_clr_count_on_resnet18() -> None:
    model = RecastModel.from_base(tiny_resnet(), RecastConfig(target="none"))
    model.add_adapter("clr")
    assert model.task_parameters("base")["adapter"] == 4_800 * 9  # 4,800 conv output channels


def test_piggyback_mask_is_packed_bits(tmp_path) -> None:
    model = RecastModel.from_base(tiny_vit(depth=2), RecastConfig(target="none"))
    model.add_adapter("piggyback")
    weights = sum(m.weight.numel() for n, m in model.net.named_modules() if n.endswith(".inner"))
    assert model.task_parameters("base")["adapter"] == weights
    record = model.save_task(tmp_path, "base")
    head = sum(t.numel() * 4 for t in model.head.task_tensors("base").values())
    mask_bytes = record["bytes"] - head
    assert weights // 8 <= mask_bytes < weights // 8 + 4096  # 1 bit per weight (+ small headers)
    bits = torch.rand(3, 5, 7) > 0.5
    assert pack_bits(bits).dtype == torch.uint8 and pack_bits(bits).numel() == (105 + 7) // 8
    assert torch.equal(unpack_bits(pack_bits(bits), bits.shape), bits)


def test_piggyback_gradient_is_straight_through() -> None:
    model = RecastModel.from_base(tiny_vit(depth=2), RecastConfig(target="none"))
    model.add_adapter("piggyback")
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    masks = [p for n, p in model.named_parameters() if n.endswith("per_task.base.mask")]
    assert masks and all(p.grad is not None and p.grad.abs().sum() > 0 for p in masks)


def test_adapters_follow_new_tasks_and_stay_apart() -> None:
    model = RecastModel.from_base(tiny_vit(depth=2), RecastConfig(target="none"))
    model.add_adapter("melo")
    model.add_task("a", 2)
    model.add_task("b", 2)
    model.set_task("b")
    wrapper = model.net.get_submodule("blocks.0.attn.qkv")
    assert set(wrapper.per_task) == {"base", "a", "b"}
    a, b = wrapper.per_task["a"]["A_q"], wrapper.per_task["b"]["A_q"]
    assert a.data_ptr() != b.data_ptr() and b.requires_grad and not a.requires_grad


@pytest.mark.parametrize(
    ("kind", "base_fn", "fits"),
    [("clr", lambda: tiny_vit(depth=2), "adaptformer, melo, piggyback"), ("melo", tiny_resnet, "clr, piggyback"),
     ("adaptformer", tiny_resnet, "clr, piggyback")],
)
def test_adapter_that_does_not_fit_says_what_fits(kind, base_fn, fits) -> None:
    model = RecastModel.from_base(base_fn(), RecastConfig(target="none"))
    with pytest.raises(ConfigError, match=f"adapters that fit it: {fits}"):
        model.add_adapter(kind)


def test_bad_adapter_options() -> None:
    model = RecastModel.from_base(tiny_vit(depth=2), RecastConfig(target="none"))
    with pytest.raises(ConfigError, match="unknown adapter"):
        model.add_adapter("prompt")
    with pytest.raises(ConfigError, match="no option"):
        model.add_adapter("melo", rnak=2)
    with pytest.raises(ConfigError, match="rank"):
        model.add_adapter("melo", rank=0)
    model.add_adapter("melo")
    with pytest.raises(ConfigError, match="already attached"):
        model.add_adapter("melo")


def run_adaptformer(placement: str, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits of a one-block ViT with an active AdaptFormer, and what norm2 and the adapter saw."""
    model = RecastModel.from_base(tiny_vit(depth=1), RecastConfig(target="none"))
    block = model.net.blocks[0]
    seen: dict[str, torch.Tensor] = {}
    block.norm2.register_forward_hook(lambda module, args, out: seen.update(stream=args[0], normed=out))
    model.add_adapter("adaptformer", input=placement, scale=2.0)
    assert isinstance(block.norm2, torch.nn.Identity) == (placement == "pre_norm")
    assert f"input={placement}" in repr(block.mlp)
    adapter = block.mlp.per_task["base"]
    torch.nn.init.normal_(adapter.up.weight)
    torch.nn.init.constant_(adapter.down.bias, 1.0)  # keep the ReLU open, so the adapter shows in the logits
    adapter.register_forward_hook(lambda module, args, out: seen.update(adapter=args[0]))
    with torch.no_grad():
        return model(x), seen


def test_adaptformer_pre_norm_reads_the_residual_stream() -> None:
    """Pre-norm: the adapter sees the block's input to norm2; post-norm: norm2's output."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 16, 16)
    pre, seen_pre = run_adaptformer("pre_norm", x)
    post, seen_post = run_adaptformer("post_norm", x)
    assert torch.equal(seen_pre["adapter"], seen_pre["stream"])
    assert torch.equal(seen_post["adapter"], seen_post["normed"])
    assert not torch.allclose(seen_pre["stream"], seen_pre["normed"])
    assert not torch.allclose(pre, post)


def test_adaptformer_option_errors() -> None:
    model = RecastModel.from_base(tiny_vit(depth=1), RecastConfig(target="none"))
    with pytest.raises(ConfigError, match="input must be one of post_norm, pre_norm"):
        model.add_adapter("adaptformer", input="before_norm")
    with pytest.raises(ConfigError, match="scale must be a finite number"):
        model.add_adapter("adaptformer", scale=float("nan"))


def test_adaptformer_defaults_are_the_reference_and_every_option_is_recorded(tmp_path) -> None:
    model = build_method("adaptformer", tiny_vit(depth=2))
    assert model.adapters == [{"kind": "adaptformer", "options": {"rank": 2, **adaptformer.REFERENCE}}]
    assert all(m.scale == 2.0 and m.norm is not None for m in model.net.modules()
               if isinstance(m, adaptformer.AdaptFormerMLP))
    model.add_task("t", 3)
    model.save_pretrained(tmp_path / "m")
    loaded = load_method(tmp_path / "m")
    assert loaded.adapters == model.adapters


def test_adaptformer_files_without_recorded_options_load_with_the_former_defaults(tmp_path) -> None:
    """Files written when post_norm and 0.1 were the defaults record neither: they must keep meaning that."""
    model = build_method("adaptformer", tiny_vit(depth=2), input="post_norm", scale=0.1)
    model.add_task("t", 3)
    model.save_pretrained(tmp_path / "m")
    config = ModelStore(tmp_path / "m").config_path
    record = json.loads(config.read_text())
    record["adapters"] = [{"kind": "adaptformer", "options": {}}]  # as files written before the change
    config.write_text(json.dumps(record))
    x = torch.randn(2, 3, 16, 16)
    loaded = load_method(tmp_path / "m")
    assert all(m.scale == 0.1 and m.norm is None for m in loaded.net.modules()
               if isinstance(m, adaptformer.AdaptFormerMLP))
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-6)


def test_piggyback_reference_learning_rates(tmp_path) -> None:
    """The reference's rates are the defaults; rates given as options win."""
    for options, expected in (({}, {"adapter": 1e-4, "coefficients": 5e-4, "head": 3e-2}),
                              ({"head_lr": 1e-2}, {"adapter": 1e-4, "coefficients": 5e-4, "head": 1e-2})):
        model = build_method("recast+piggyback", narrow_resnet(), **options)
        model.add_task("t", 3)
        model.set_task("t")
        groups = {g["name"]: g for g in model.param_groups(2e-3)}
        assert {k: groups[k]["lr"] for k in ("adapter", "coefficients", "head")} == expected
        assert groups["adapter"]["weight_decay"] == 0.0
    model.save_pretrained(tmp_path)
    loaded = RecastModel.from_pretrained(tmp_path)
    assert loaded.tasks["t"].meta["method_options"]["lrs"] == expected
