"""Nested random subsets of a store's rows, for datastore-size scaling (MassiveDS-style subsampling).

One permutation per seed: the subset at fraction f is its first ceil(f * n) rows, so every smaller
subset is contained in every larger one and a curve over fractions measures size alone.
"""

from __future__ import annotations

import math

import numpy as np

from ralm.errors import RalmError


def nested_rows(n: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted rows of the ``fraction`` subset of ``range(n)`` (at least one row)."""
    if not 0 < fraction <= 1:
        raise RalmError(f"subset fraction {fraction}: must be in (0, 1]")
    if n < 1:
        raise RalmError("cannot subsample an empty store")
    take = max(1, math.ceil(fraction * n))
    return np.sort(np.random.default_rng(seed).permutation(n)[:take]).astype(np.int64)
