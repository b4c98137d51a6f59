"""Seeded, stratified index splits: the one way every data source carves held-out sets."""

from __future__ import annotations

import numpy as np

from recast.errors import ConfigError


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(kept, held_out)`` with about ``fraction`` of each class held out.

    Per class, indices are shuffled with a generator seeded by ``seed`` and the first
    ``round(fraction * n)`` are held out, but a class never loses its last example. Both outputs
    are sorted, so the result depends only on ``labels``, ``fraction`` and ``seed``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"split fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        count = min(round(fraction * len(members)), len(members) - 1)
        if count > 0:
            held.append(rng.permutation(members)[:count])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held_out)
    return kept, held_out
