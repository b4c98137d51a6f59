"""Each script in examples/ runs on tiny inputs and says what it promises."""

import re
import subprocess
import sys
from pathlib import Path

from safetensors.torch import save_file

from tests.helpers import tiny_resnet

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_adapter_example(tmp_path):
    out = run_example("adapters.py", "--out", str(tmp_path), "--steps", "3")
    assert "reloaded equals trained: True" in out and "export equals trained: True" in out


def test_hub_weights_example_with_a_local_checkpoint(tmp_path):
    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_resnet("resnet18", num_classes=1000).state_dict().items()}, weights)
    out = run_example("hub_weights.py", "--model", "timm:resnet18", "--weights", str(weights))
    error = float(re.search(r"weight relative error ([0-9.e+-]+)", out).group(1))
    assert error < 1e-5 and "'coefficients': 16" in out  # exact fit of the local weights, ResNet-18 count
