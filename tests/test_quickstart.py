import subprocess
import sys
from pathlib import Path

from recast import RecastModel
from recast.quickstart import run_quickstart
from tests.helpers import tiny_vit

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_learns_two_tasks_without_forgetting(tmp_path):
    summary = run_quickstart(tiny_vit(depth=2), tmp_path, steps=25, image_size=16)
    assert summary["first_task_unchanged"] is True
    assert summary["quadrants"]["accuracy"] > 0.5  # four classes: chance is 0.25
    assert summary["quadrants"]["params"]["coefficients"] == 2 * 2 * 2  # 2 blocks, n=2 (one group), K=2
    loaded = RecastModel.from_pretrained(tmp_path)
    assert set(loaded.tasks) == {"base", "quadrants", "corners"}


def test_example_script_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path), "--steps", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "export matches: True" in result.stdout
