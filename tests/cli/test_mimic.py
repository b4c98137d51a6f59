"""``recast mimic`` on a tiny timm model from a local checkpoint the test writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from recast import RecastModel
from recast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False)
    path = tmp_path_factory.mktemp("ckpt") / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _mimic(*args: str) -> list[str]:
    return ["mimic", "--model", "timm:test_vit", "--no-progress", *args]


def test_mimic_writes_model_and_fidelity_report(checkpoint, image_folder, tmp_path, capsys) -> None:
    out = tmp_path / "model"
    code = main(_mimic("--weights", str(checkpoint), "--target", "att+mlp", "--groups", "3",
                       "--images", str(image_folder), "--out", str(out), "--json"))
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "svd" and summary["weight_cosine_min"] >= 0.99999
    assert summary["features"]["top1_agreement"] == 1.0 and summary["features"]["images"] == 4
    report = json.loads((out / "fidelity.json").read_text())
    assert len(report["layers"]) == 18 and "blocks.0" in report["features"]["feature_cosine"]
    loaded = RecastModel.from_pretrained(out)
    assert loaded.mimicry_report["weight_rel_error"] == pytest.approx(summary["weight_rel_error"])


def test_mimic_iterative_with_options_and_data_refinement(checkpoint, image_folder, tmp_path, capsys) -> None:
    out = tmp_path / "model"
    code = main(_mimic("--weights", str(checkpoint), "--target", "mlp", "--groups", "2", "--templates", "1",
                       "--method", "iterative", "--steps", "20", "--lr", "0.01", "--option", "noise=0",
                       "--images", str(image_folder), "--refine-data", "--refine-steps", "3", "--out", str(out)))
    assert code == 0
    text = capsys.readouterr().out
    assert "method iterative" in text and "top-1 agreement" in text
    report = json.loads((out / "fidelity.json").read_text())
    assert report["options"]["steps"] == 20 and report["options"]["noise"] == 0
    assert report["refine"]["steps"] == 3


def test_mimic_curve_writes_json_and_png(checkpoint, tmp_path) -> None:
    out = tmp_path / "curve"
    assert main(_mimic("--weights", str(checkpoint), "--target", "att", "--groups", "3", "--curve",
                       "--out", str(out))) == 0
    points = json.loads((out / "curve.json").read_text())["points"]
    assert [p["templates"] for p in points] == [1, 2, 3]
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_method_is_a_clear_error(checkpoint, tmp_path, capsys) -> None:
    code = main(_mimic("--weights", str(checkpoint), "--groups", "3", "--method", "magic", "--out", str(tmp_path)))
    assert code == 2
    assert "unknown mimicry method 'magic'; choose one of svd, iterative" in capsys.readouterr().err


def test_wrong_file_is_a_clear_error(tmp_path, capsys) -> None:
    missing = tmp_path / "nope.safetensors"
    assert main(_mimic("--weights", str(missing), "--out", str(tmp_path / "o"))) == 2
    assert "weights file not found" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    assert main(_mimic("--weights", str(garbage), "--out", str(tmp_path / "o"))) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path, capsys) -> None:
    other = timm.create_model("test_vit", pretrained=False, embed_dim=32, num_heads=2)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    assert main(_mimic("--weights", str(path), "--out", str(tmp_path / "o"))) == 2
    err = capsys.readouterr().err
    assert "does not fit VisionTransformer" in err and "shape of blocks.0.attn.qkv.weight" in err


def test_missing_model_and_refine_without_images_are_clear_errors(checkpoint, tmp_path, capsys) -> None:
    assert main(["mimic", "--out", str(tmp_path)]) == 2
    assert "needs --model SPEC" in capsys.readouterr().err
    assert main(_mimic("--weights", str(checkpoint), "--groups", "3", "--refine-data", "--out", str(tmp_path))) == 2
    assert "--refine-data needs --images" in capsys.readouterr().err
