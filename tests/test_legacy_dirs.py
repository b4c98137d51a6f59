"""Model directories written by the released format (``tests/fixtures/legacy``) still load exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

import safetensors.torch
import torch

from recast.format import verify_model_dir
from recast.methods import load_method

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


def test_legacy_recast_and_lora_directories_load_with_their_logits(tmp_path) -> None:
    expected = safetensors.torch.load_file(LEGACY / "expected.safetensors")
    x = expected["x"]
    recast_model = load_method(LEGACY / "recast")
    assert list(recast_model.tasks) == ["base", "digits"]
    assert recast_model.tasks["digits"].class_names == ["a", "b", "c", "d"]
    with torch.no_grad():
        for task in ("base", "digits"):
            recast_model.set_task(task)
            torch.testing.assert_close(recast_model(x), expected[f"recast.{task}"], rtol=0, atol=1e-6)
    lora = load_method(LEGACY / "lora")
    assert lora.method == "lora" and "digits" in lora.tasks
    lora.set_task("digits")
    with torch.no_grad():
        torch.testing.assert_close(lora(x), expected["lora.digits"], rtol=0, atol=1e-6)


def test_legacy_lora_directory_is_rewritten_in_the_pinned_layout(tmp_path) -> None:
    """Saving an older baseline directory again pins every file by sha256, as RECAST does."""
    directory = tmp_path / "lora"
    shutil.copytree(LEGACY / "lora", directory)
    model = load_method(directory)
    model.save_pretrained(directory)
    assert verify_model_dir(directory) == []
    again = load_method(directory)
    assert again.fingerprint == model.fingerprint and list(again.tasks) == list(model.tasks)
