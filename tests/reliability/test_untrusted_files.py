"""No file the project reads can run code: a malicious pickle is refused and its payload never runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from recast.backbones import load_backbone
from recast.errors import FileFormatError


class _Payload:
    """Unpickling this calls ``os.mkdir(marker)``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return os.mkdir, (self.marker,)


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint that looks like a state dict but carries the payload."""
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    return path


@pytest.mark.parametrize("name", ["weights.pth", "weights.bin", "weights.safetensors"])
def test_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path, name):
    marker = tmp_path / "payload-ran"
    path = _malicious_checkpoint(tmp_path / name, marker)
    with pytest.raises(FileFormatError, match=f"{name}: not a readable checkpoint"):
        load_backbone("timm:resnet18", weights=str(path))
    assert not marker.exists()


def test_the_payload_is_live(tmp_path):
    """The same file does run code when loaded the unsafe way, so the test above means something."""
    marker = tmp_path / "payload-ran"
    path = _malicious_checkpoint(tmp_path / "weights.pth", marker)
    torch.load(path, weights_only=False)
    assert marker.is_dir()


def test_everything_the_project_writes_is_safetensors_or_json(tmp_path):
    from tests.reliability.common import tiny_model

    tiny_model().save_pretrained(tmp_path)
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != ".lock":
            head = path.read_bytes()[:2]
            assert path.suffix in (".json", ".safetensors") and head != b"\x80\x04" and not head.startswith(b"PK")
