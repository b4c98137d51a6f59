import json

import pytest
import torch

from recast import FileFormatError, RecastConfig, RecastModel, TaskError
from recast.layers import GeneratedLinear
from tests.helpers import rel_error, tiny_resnet, tiny_vit


def nudge(model: RecastModel, task: str, amount: float = 0.3, seed: int = 0) -> None:
    """Move every coefficient of ``task`` by a random amount, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in model.task_modules():
            if module.kind == "coefficients":
                c = module.coefficients(task)
                c.add_(amount * torch.randn(c.shape, generator=generator))


@pytest.fixture
def vit():
    return tiny_vit(depth=4)


@pytest.fixture
def images():
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("target", ["att", "mlp", "att+mlp"])
def test_exact_mimicry_reproduces_vit_logits(vit, images, target):
    model = RecastModel.from_base(vit, RecastConfig(target=target, groups=2)).eval()
    with torch.no_grad():
        assert rel_error(model(images), vit(images)) < 1e-4
    assert model.mimicry_report["weight_cosine_min"] > 0.99999
    assert model.mimicry_report["weight_rel_error"] < 1e-5


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_exact_mimicry_reproduces_resnet_logits(name):
    base = tiny_resnet(name)
    x = torch.randn(2, 3, 32, 32)
    model = RecastModel.from_base(base, RecastConfig(target="conv")).eval()
    with torch.no_grad():
        ref = base(x)
        assert rel_error(model(x), ref) < 1e-4
        nudge(model, "base")
        assert rel_error(model(x), ref) > 1e-3  # the generated convolutions do matter


def test_export_and_reload_equal_the_generated_forward(vit, images, tmp_path):
    model = RecastModel.from_base(vit, RecastConfig(target="att+mlp", groups=2)).eval()
    model.add_task("a", num_classes=3, class_names=["x", "y", "z"])
    nudge(model, "a")
    model.set_task("a")
    with torch.no_grad():
        out = model(images)
        assert out.shape == (4, 3)
        plain = model.export("a").eval()
        assert not any(isinstance(m, GeneratedLinear) for m in plain.modules())
        assert rel_error(plain(images), out) < 1e-5
        model.save_pretrained(tmp_path)
        loaded = RecastModel.from_pretrained(tmp_path).eval()
        loaded.set_task("a")
        assert torch.equal(loaded(images), out)
        loaded.set_task("base")
        assert rel_error(loaded(images), vit(images)) < 1e-4
    assert loaded.tasks["a"].class_names == ["x", "y", "z"]


@pytest.mark.parametrize("templates", [1, 3])
def test_fewer_and_more_templates_than_layers(vit, images, templates):
    model = RecastModel.from_base(vit, RecastConfig(target="mlp", groups=2, templates=templates)).eval()
    assert model.banks["blocks_mlp_fc1__g0"].size == templates
    if templates == 1:  # compression: the best rank-1 fit, not exact
        assert 0 < model.mimicry_report["weight_rel_error"] < 1
    else:  # spare directions: still exact, and a coefficient on the spare template changes the output
        assert model.mimicry_report["weight_rel_error"] < 1e-5
        layer = model.net.blocks[0].mlp.fc1
        assert torch.all(layer.coefficients("base")[:, 2] == 0)
        with torch.no_grad():
            before = model(images)
            layer.coefficients("base")[:, 2] += 0.5
            assert not torch.allclose(model(images), before)


def test_tasks_are_isolated_bit_for_bit(vit, images):
    model = RecastModel.from_base(vit, RecastConfig(target="att", groups=2)).eval()
    model.add_task("a", 3)
    model.add_task("b", 3)
    nudge(model, "a", seed=1)
    model.set_task("a")
    with torch.no_grad():
        before = model(images).clone()
        nudge(model, "b", seed=2)
        model.set_task("b")
        other = model(images)
        model.set_task("a")
        assert torch.equal(model(images), before)
        assert not torch.allclose(other[:, :3], before)
    layer = model.net.blocks[0].attn.qkv
    ptrs = {layer.coefficients(t).data_ptr() for t in ("base", "a", "b")}
    assert len(ptrs) == 3  # tasks share no storage


def test_only_the_active_task_gets_gradients(vit, images):
    model = RecastModel.from_base(vit, RecastConfig(target="att", groups=2))
    model.add_task("a", 3)
    model.add_task("b", 3)
    model.set_task("a")
    model(images).sum().backward()
    named = dict(model.named_parameters())
    with_grad = {n for n, p in named.items() if p.grad is not None}
    assert with_grad == {n for n, p in named.items() if p.requires_grad}
    assert with_grad == {"coefficient_table.per_task.a", "net.head.per_task.weight.a", "net.head.per_task.bias.a"}
    assert len(model.trainable_parameters()) == 1 + 2  # task a's coefficients of all 4 qkv layers + head weight, bias


def test_forward_tasks_equals_per_task_forwards(vit, images):
    model = RecastModel.from_base(vit, RecastConfig(target="att", groups=2)).eval()
    model.add_task("a", 3)
    model.add_task("b", 7)
    nudge(model, "a", seed=3)
    nudge(model, "b", seed=4)
    tasks = ["a", "b", "b", "a"]
    with torch.no_grad():
        mixed = model.forward_tasks(images, tasks)
        for i, task in enumerate(tasks):
            model.set_task(task)
            single = model(images[i : i + 1])[0]
            torch.testing.assert_close(mixed[i, : single.shape[0]], single)
    assert mixed.shape == (4, 7) and torch.isinf(mixed[0, 3:]).all()


def test_batchnorm_frozen_unless_a_task_keeps_its_own():
    base = tiny_resnet("resnet18")
    model = RecastModel.from_base(base, RecastConfig(target="conv"))
    model.add_task("frozen", 3)
    model.add_task("own", 3, own_bn=True)
    bn = model.net.layer1[0].bn1
    x = torch.randn(4, 3, 32, 32) * 3 + 1
    model.train()
    model.set_task("frozen")
    stats = bn.bn.running_mean.clone()
    model(x)
    assert torch.equal(bn.bn.running_mean, stats)
    model.set_task("own")
    model(x)
    assert torch.equal(bn.bn.running_mean, stats)
    assert not torch.equal(bn.per_task["own"].running_mean, stats)
    counts = model.task_parameters("own")
    bn_numel = sum(2 * m.bn.num_features for _, m in model.task_modules() if m.kind == "other")
    assert counts["other"] == bn_numel and model.task_parameters("frozen")["other"] == 0


def test_own_bn_statistics_survive_save_and_load(tmp_path):
    model = RecastModel.from_base(tiny_resnet("resnet18"), RecastConfig(target="conv"))
    model.add_task("own", 3, own_bn=True)
    model.set_task("own")
    model.train()
    model(torch.randn(4, 3, 32, 32) + 2)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        model.save_pretrained(tmp_path)
        loaded = RecastModel.from_pretrained(tmp_path).eval()
        loaded.set_task("own")
        assert torch.equal(loaded(x), out)
        assert torch.allclose(model.export("own").eval()(x), out, atol=1e-5)
    with pytest.raises(TaskError, match="own_bn=True needs BatchNorm layers"):
        RecastModel.from_base(tiny_vit(depth=2), RecastConfig(target="att", groups=1)).add_task("x", 2, own_bn=True)


def test_task_file_is_small_and_records_counts(tmp_path):
    import timm

    vit_s = timm.create_model("vit_small_patch16_224", pretrained=False)
    model = RecastModel.from_base(vit_s, RecastConfig(target="att"))
    model.add_task("ten", 10)
    record = model.save_task(tmp_path, "ten")
    path = tmp_path / "tasks" / "ten.safetensors"
    assert record["params"] == {"coefficients": 48, "head": 3850, "other": 0}
    assert record["bytes"] == path.stat().st_size
    head_bytes = 3850 * 4
    assert path.stat().st_size - head_bytes < 1024
    assert json.loads((tmp_path / "tasks" / "ten.json").read_text())["fingerprint"] == model.fingerprint


def test_task_from_another_backbone_is_refused_and_nothing_changes(vit, images, tmp_path):
    model = RecastModel.from_base(vit, RecastConfig(target="att", groups=2))
    model.add_task("a", 3)
    model.save_pretrained(tmp_path / "one")
    other = RecastModel.from_base(tiny_vit(depth=4, seed=5), RecastConfig(target="att", groups=2)).eval()
    with torch.no_grad():
        before = other(images)
    with pytest.raises(FileFormatError, match="made for another backbone"):
        other.load_task(tmp_path / "one", "a")
    assert list(other.tasks) == ["base"] and other.active_task == "base"
    with torch.no_grad():
        assert torch.equal(other(images), before)


def test_corrupt_and_missing_files_are_refused(vit, tmp_path):
    model = RecastModel.from_base(vit, RecastConfig(target="att", groups=2))
    model.add_task("a", 3)
    model.save_pretrained(tmp_path)
    path = tmp_path / "tasks" / "a.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="a.safetensors: checksum mismatch"):
        model.load_task(tmp_path, "a", replace=True)
    with pytest.raises(FileFormatError, match="nope.json: file not found"):
        model.load_task(tmp_path, "nope")
    (tmp_path / "recast_config.json").write_text("{not json")
    with pytest.raises(FileFormatError, match="recast_config.json: not valid JSON"):
        RecastModel.from_pretrained(tmp_path)


def test_task_name_errors(vit):
    model = RecastModel.from_base(vit, RecastConfig(target="att", groups=2))
    with pytest.raises(TaskError, match="no task named 'zzz'; existing tasks: base"):
        model.set_task("zzz")
    with pytest.raises(TaskError, match="invalid task name '../x'"):
        model.add_task("../x", 2)
    with pytest.raises(TaskError, match="task 'base' already exists"):
        model.add_task("base", 2)
    with pytest.raises(TaskError, match="num_classes must be a positive integer, got 0"):
        model.add_task("y", 0)
    with pytest.raises(TaskError, match="2 class names given for 3 classes"):
        model.add_task("y", 3, class_names=["a", "b"])
    model.delete_task("base")
    with pytest.raises(TaskError, match="no task is active"):
        model(torch.randn(1, 3, 16, 16))


def test_new_task_starts_from_the_mimicry_values(vit):
    model = RecastModel.from_base(vit, RecastConfig(target="att", groups=2))
    nudge(model, "base")
    model.add_task("fresh", 4)
    layer = model.net.blocks[1].attn.qkv
    assert torch.equal(layer.coefficients("fresh"), layer.mimicry)
    assert not torch.equal(layer.coefficients("base"), layer.mimicry)
    model.add_task("copy", 4, init_from="base")
    assert torch.equal(layer.coefficients("copy"), layer.coefficients("base"))


def test_head_only_model_fingerprints_its_whole_backbone(tmp_path):
    one = RecastModel.from_base(tiny_vit(depth=2, seed=0), RecastConfig(target="none"))
    two = RecastModel.from_base(tiny_vit(depth=2, seed=1), RecastConfig(target="none"))
    assert not one.banks and one.task_parameters("base") == {"coefficients": 0, "head": 5 * 32 + 5, "other": 0}
    assert one.fingerprint != two.fingerprint
    one.add_task("a", 2)
    one.save_pretrained(tmp_path)
    with pytest.raises(FileFormatError, match="made for another backbone"):
        two.load_task(tmp_path, "a")


def test_data_refinement_from_base_moves_the_compressed_fit_towards_the_features(vit, images):
    plain = RecastModel.from_base(vit, RecastConfig(target="mlp", groups=1, templates=1)).eval()
    refined = RecastModel.from_base(vit, RecastConfig(target="mlp", groups=1, templates=1),
                                    refine_images=torch.randn(16, 3, 16, 16)).eval()
    assert "refine" in refined.mimicry_report
    with torch.no_grad():
        reference = vit(images)
        assert rel_error(refined(images), reference) < rel_error(plain(images), reference)
