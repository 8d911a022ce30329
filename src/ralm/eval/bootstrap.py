"""Percentile-bootstrap confidence intervals over documents or examples (issue 15's ``ralm diagnose``).

A metric is computed from per-unit values (a unit: one evaluated document or task example), so resampling units
with replacement resamples whole documents, as the evaluation's variance comes from which documents were drawn:

- ``"mean"`` (EM, F1, ROUGE, accuracy): the mean of the per-unit scores;
- ``"ppl"``: exp(sum of the units' NLL / sum of their tokens), i.e. the token-weighted mean NLL of the resampled
  documents (``values`` = each document's summed NLL in nats, ``weights`` = its scored tokens);
- ``"bpb"``: sum of NLL / (ln 2 · sum of bytes) (``weights`` = each document's scored bytes).

``paired_difference`` resamples the SAME units for both conditions (the real store and an ablation scored on the
same documents), so the interval of the difference excludes the between-document variance both share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ralm.errors import RalmError

KINDS = ("mean", "ppl", "bpb")


@dataclass(frozen=True)
class Interval:
    """A statistic on all units and its percentile-bootstrap interval at ``level``."""

    estimate: float
    low: float
    high: float
    level: float = 0.95

    def excludes_zero(self) -> int:
        """+1 if the whole interval is above 0, -1 if below, 0 if it covers 0."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def to_json(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level}


def document_units(per_target: Mapping[str, Any]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Doc ids (sorted), summed NLL and scored tokens per document from ``run_eval_lm(per_target=)``'s
    doc id -> (n_targets,) NLL: the ``values`` and ``weights`` of a ``"ppl"`` bootstrap."""
    ids = sorted(per_target)
    nll = np.array([float(np.asarray(per_target[d], dtype=np.float64).sum()) for d in ids])
    tokens = np.array([np.asarray(per_target[d]).size for d in ids], dtype=np.float64)
    return ids, nll, tokens


def _arrays(values: Sequence[float] | np.ndarray, weights: Sequence[float] | np.ndarray | None,
            kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    if kind not in KINDS:
        raise RalmError(f"bootstrap metric {kind!r}: choose from {', '.join(KINDS)}")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(v) == 0:
        raise RalmError("bootstrap: no units (documents or examples) to resample")
    if not np.isfinite(v).all():
        raise RalmError("bootstrap: per-unit values must be finite")
    if kind == "mean":
        if weights is not None:
            raise RalmError("bootstrap metric 'mean' takes no weights (it is the mean of per-unit scores)")
        return v, None
    if weights is None:
        raise RalmError(f"bootstrap metric {kind!r} needs weights (tokens or bytes per document)")
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(w) != len(v):
        raise RalmError(f"bootstrap: {len(v)} values but {len(w)} weights")
    if (w <= 0).any() or not np.isfinite(w).all():
        raise RalmError("bootstrap: weights (tokens or bytes per document) must be positive")
    return v, w


def _stat(v: np.ndarray, w: np.ndarray | None, kind: str, idx: np.ndarray | None = None) -> np.ndarray | float:
    """The statistic on all units (``idx`` None) or per resample (``idx`` (n_boot, n) unit indices)."""
    if idx is None:
        s, t = v.sum(), (len(v) if w is None else w.sum())
    else:
        s = v[idx].sum(axis=1)  # (n_boot,)
        t = idx.shape[1] if w is None else w[idx].sum(axis=1)
    if kind == "mean":
        return s / t
    if kind == "ppl":
        return np.exp(s / t)
    return s / (t * math.log(2))


def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    if n_boot < 1:
        raise RalmError(f"--n-boot {n_boot}: must be >= 1")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # (n_boot, n)


def _interval(estimate: float, boots: np.ndarray, level: float) -> Interval:
    if not 0 < level < 1:
        raise RalmError(f"confidence level {level}: must be in (0, 1)")
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(estimate), float(lo), float(hi), level)


def bootstrap(values: Sequence[float] | np.ndarray, weights: Sequence[float] | np.ndarray | None = None,
              kind: str = "mean", n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Interval:
    """The metric of all units and its percentile-bootstrap interval over ``n_boot`` resamples of the units."""
    v, w = _arrays(values, weights, kind)
    idx = _resamples(len(v), n_boot, seed)
    return _interval(_stat(v, w, kind), _stat(v, w, kind, idx), level)


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                      weights: Sequence[float] | np.ndarray | None = None, kind: str = "mean",
                      n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Interval:
    """metric(a) - metric(b) on the same units (``a[i]`` and ``b[i]``: unit i under two conditions, with the
    same tokens or bytes ``weights[i]``), each resample drawing the same units for both."""
    va, w = _arrays(a, weights, kind)
    vb, _ = _arrays(b, weights, kind)
    if len(va) != len(vb):
        raise RalmError(f"paired bootstrap: {len(va)} units against {len(vb)}; pair the same documents")
    idx = _resamples(len(va), n_boot, seed)
    return _interval(_stat(va, w, kind) - _stat(vb, w, kind), _stat(va, w, kind, idx) - _stat(vb, w, kind, idx),
                     level)
