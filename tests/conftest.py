"""Test-wide setup: never touch the network, keep runs deterministic and small."""

import os

from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

# Property tests draw the same examples on every run, so CI cannot turn red by chance.
settings.register_profile("recast", derandomize=True, deadline=None)
settings.load_profile("recast")
