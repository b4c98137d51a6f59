"""Test-wide setup: never touch the network, keep runs deterministic and small."""

import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

# Property tests draw the same examples on every run, so CI cannot turn red by chance.
settings.register_profile("recast", derandomize=True, deadline=None)
settings.load_profile("recast")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread avoids thread contention on a 2-core CPU (often 10x faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
