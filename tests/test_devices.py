"""One rule for the ``--device`` of training and benchmarks: names it accepts, and what it says otherwise."""

import pytest
import torch

from recast.cli import main
from recast.distributed import check_device, init_distributed
from recast.errors import ConfigError


@pytest.mark.parametrize("device", ["gpu", "cpu:0", "cuda:x", "cuda:", "", "CUDA"])
def test_malformed_device_names_are_refused_with_the_accepted_forms(device):
    with pytest.raises(ConfigError, match="use cpu, cuda or cuda:N"):
        check_device(device)


def test_cuda_without_a_visible_gpu_says_to_use_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        check_device("cuda:0")
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        init_distributed("cuda")
    assert check_device("cpu") == "cpu" and init_distributed("cpu").device == "cpu"


def test_a_gpu_index_beyond_the_machine_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0") == "cuda:0"
    with pytest.raises(ConfigError, match="1 CUDA GPU"):
        check_device("cuda:1")


@pytest.mark.parametrize("argv, message", [
    (["bench", "--perf", "--device", "gpu"], "use cpu, cuda or cuda:N"),
    (["bench", "--perf", "--batch", "0"], "must be at least 1"),
    (["bench", "--dry-run", "--max-train-images", "-1"], "0 (every image) or more"),
    (["bench", "--dry-run", "--workers", "-2"], "--workers must be 0 or more"),
])
def test_bench_refuses_bad_device_and_size_options_before_any_work(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
