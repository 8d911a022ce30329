"""How much the retrieved context varies across the evaluated inputs (issue 15's ``ralm diagnose``).

A retriever that has become a soft prompt hands (nearly) every input the same context. Over a retrieval log
(per input, the list of retrieved row ids; ``RetrievalLog.ids()``), the definitions, one line each:

- ``mean_jaccard``: mean over all pairs of inputs of |A ∩ B| / |A ∪ B| of their retrieved id sets (two empty
  sets count 1); sampled pairs beyond ``max_pairs``. 1 = every input gets the same ids.
- ``entropy``: Shannon entropy of the retrieved-id distribution (each id's share of all retrievals) divided
  by log of the most ids the retrievals could have spread over, min(retrievals, store rows). 0 = one id.
- ``distinct_ids``: number of different ids retrieved over all inputs.
- ``top1pct_share``: share of all retrievals that go to the most retrieved 1% of the distinct ids (at least one).
- ``query_sensitivity``: share of inputs whose retrieved id set changes when their query is perturbed
  (a second log, input by input). 0 = the query does not matter.
- ``mean_cosine_to_mean``: mean cosine of each input's context embedding (by default the mean key vector of
  its retrieved rows) to the mean of all the inputs' unit-normalised context embeddings. 1 = every input's
  context points the same way.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ralm.errors import RalmError

Log = Sequence[Sequence[int]]


def _sets(log: Log) -> list[frozenset[int]]:
    return [frozenset(int(i) for i in ids if i >= 0) for ids in log]


def mean_jaccard(log: Log, max_pairs: int = 200_000, seed: int = 0) -> float:
    """Mean pairwise Jaccard of the inputs' id sets (exact up to ``max_pairs`` pairs, else a seeded sample)."""
    sets = _sets(log)
    n = len(sets)
    if n < 2:
        raise RalmError(f"mean Jaccard: {n} input(s); needs at least 2")
    total = n * (n - 1) // 2
    if total <= max_pairs:
        pairs: Any = ((i, j) for i in range(n) for j in range(i + 1, n))
    else:
        rng = np.random.default_rng(seed)
        a, b = rng.integers(0, n, size=(2, max_pairs))
        b = np.where(a == b, (b + 1) % n, b)  # a pair of two different inputs
        pairs = zip(a.tolist(), b.tolist(), strict=True)
    scores = [len(sets[i] & sets[j]) / len(sets[i] | sets[j]) if sets[i] | sets[j] else 1.0 for i, j in pairs]
    return float(np.mean(scores))


def id_distribution(log: Log, store_rows: int | None = None) -> dict[str, float]:
    """``entropy`` (normalised), ``distinct_ids`` and ``top1pct_share`` of the retrieved ids (module docstring)."""
    counts = Counter(int(i) for ids in log for i in ids if i >= 0)
    total = sum(counts.values())
    if total == 0:
        return {"entropy": 0.0, "distinct_ids": 0, "top1pct_share": 0.0}
    p = np.array(list(counts.values()), dtype=np.float64) / total
    reach = min(total, store_rows) if store_rows else total
    entropy = float(-(p * np.log(p)).sum() / math.log(reach)) if reach > 1 else 0.0
    top = max(1, math.ceil(0.01 * len(counts)))
    share = float(np.sort(p)[::-1][:top].sum())
    return {"entropy": entropy, "distinct_ids": len(counts), "top1pct_share": share}


def query_sensitivity(log: Log, perturbed: Log) -> float:
    """Share of inputs whose retrieved id set differs between ``log`` and ``perturbed`` (the same inputs)."""
    if len(log) != len(perturbed):
        raise RalmError(f"query sensitivity: {len(log)} inputs against {len(perturbed)} perturbed ones")
    if not log:
        raise RalmError("query sensitivity: no inputs")
    return float(np.mean([a != b for a, b in zip(_sets(log), _sets(perturbed), strict=True)]))


def mean_cosine_to_mean(embeddings: np.ndarray) -> float:
    """Mean cosine of each row of ``embeddings`` (n, d) to the mean of the unit-normalised rows."""
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2 or len(e) == 0:
        raise RalmError(f"context embeddings of shape {e.shape}: must be a non-empty (inputs, dim) array")
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    if (norms == 0).any():
        raise RalmError("context embeddings: a zero vector has no direction")
    u = e / norms  # (n, d)
    m = u.mean(axis=0)
    if np.linalg.norm(m) == 0:
        return 0.0
    return float((u @ (m / np.linalg.norm(m))).mean())


def context_embeddings(log: Log, keys: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """(inputs, dim): each input's context embedding, the mean of its retrieved rows' key vectors (``keys``: rows
    -> (n, dim), e.g. a dense store's ``_keys().get``); an input that retrieved nothing has no context."""
    sets = [np.array([i for i in ids if i >= 0], dtype=np.int64) for ids in log]
    if empty := sum(len(s) == 0 for s in sets):
        raise RalmError(f"context embeddings: {empty} input(s) retrieved no rows")
    return np.stack([np.asarray(keys(s), dtype=np.float64).mean(axis=0) for s in sets])


def context_variance(log: Log, embeddings: np.ndarray | None = None, perturbed: Log | None = None,
                     store_rows: int | None = None, max_pairs: int = 200_000, seed: int = 0) -> dict[str, Any]:
    """Every metric of the module docstring that the inputs allow (query sensitivity needs ``perturbed``, the
    cosine needs ``embeddings``, one row per input)."""
    if embeddings is not None and len(embeddings) != len(log):
        raise RalmError(f"context embeddings: {len(embeddings)} rows for {len(log)} inputs")
    out: dict[str, Any] = {"inputs": len(log), "mean_jaccard": mean_jaccard(log, max_pairs, seed),
                           **id_distribution(log, store_rows)}
    if perturbed is not None:
        out["query_sensitivity"] = query_sensitivity(log, perturbed)
    if embeddings is not None:
        out["mean_cosine_to_mean"] = mean_cosine_to_mean(embeddings)
    return out
