"""Row-aligned fp16 key parts on disk, read memory-mapped, plus exact search and recall helpers.

Global row r of a store is row ``r - offsets[p]`` of key part ``p``; FAISS ids are global rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np


class KeyParts:
    """A read-only view of the key parts of a store, in part order."""

    def __init__(self, paths: Sequence[Path | str]):
        self.parts = [np.load(p, mmap_mode="r") for p in paths]
        sizes = [len(x) for x in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.dim = int(self.parts[0].shape[1]) if self.parts else 0

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part index, row within part) of global rows."""
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        return part, rows - self.offsets[part]

    def get(self, rows: np.ndarray) -> np.ndarray:
        """float32 keys of global ``rows`` (any order, any shape)."""
        flat = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(flat), self.dim), dtype=np.float32)
        part, local = self.locate(flat)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.parts[p][local[sel]]
        return out.reshape(*np.shape(rows), self.dim)

    def blocks(self, rows: np.ndarray | None = None, block: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (global ids, float32 keys) blocks, over all rows or the given sorted subset."""
        if rows is None:
            for p, part in enumerate(self.parts):
                for s in range(0, len(part), block):
                    xb = np.asarray(part[s:s + block], dtype=np.float32)
                    yield np.arange(self.offsets[p] + s, self.offsets[p] + s + len(xb), dtype=np.int64), xb
        else:
            for s in range(0, len(rows), block):
                ids = rows[s:s + block]
                yield ids, self.get(ids)


def exact_search(keys: KeyParts, xq: np.ndarray, k: int, rows: np.ndarray | None = None,
                 metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k in numpy: the ground truth for recall and for tests.

    ``metric`` "ip": D holds inner products, best (largest) first; "l2": squared L2 distances, best
    (smallest) first, as FAISS reports them.
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    nq = len(xq)
    sign = 1.0 if metric == "ip" else -1.0  # rank by sign * score, largest first
    D = np.full((nq, k), -np.inf, dtype=np.float32)
    I = np.full((nq, k), -1, dtype=np.int64)  # noqa: E741 (faiss naming)
    q_norms = (xq * xq).sum(1)[:, None] if metric == "l2" else None
    for ids, xb in keys.blocks(rows):
        s = xq @ xb.T  # (nq, block)
        if q_norms is not None:
            s = -(q_norms - 2 * s + (xb * xb).sum(1)[None, :])  # -|q - x|^2
        kk = min(k, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        D = np.concatenate([D, np.take_along_axis(s, top, 1)], axis=1)
        I = np.concatenate([I, ids[top]], axis=1)  # noqa: E741
        order = np.argsort(-D, axis=1, kind="stable")[:, :k]
        D, I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)  # noqa: E741
    return sign * D, I


def recall_at_k(I_approx: np.ndarray, I_exact: np.ndarray, k: int = 10, S_approx: np.ndarray | None = None,
                D_exact: np.ndarray | None = None, metric: str = "ip", tol: np.ndarray | float = 0.0) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k (set recall, insensitive to order).

    With ``S_approx`` (the exact scores of the returned ids, ``true_scores``) and ``D_exact`` (exact_search's
    scores), ties count: a returned id that scores as well as the k-th exact score (within ``tol``, per query)
    is a hit even where exact search happened to keep another id of that score. Without this, duplicate keys
    make even an exact index look approximate.
    """
    hits, denom = [], []
    for q, (a, b) in enumerate(zip(I_approx, I_exact, strict=True)):
        want = set(b[:k]) - {-1}
        found = set(a[:k]) - {-1}
        n = len(found & want)
        if S_approx is not None and D_exact is not None and want:
            kth = D_exact[q, min(k, len(want)) - 1]
            t = np.broadcast_to(tol, (len(I_exact),))[q]
            tied = S_approx[q, :k] >= kth - t if metric == "ip" else S_approx[q, :k] <= kth + t
            n += sum(1 for i, ok in zip(a[:k], tied, strict=True) if ok and i != -1 and i not in want)
        hits.append(min(n, max(1, len(want))))
        denom.append(max(1, len(want)))
    return float(np.mean(np.array(hits) / np.array(denom)))


def true_scores(keys: KeyParts, xq: np.ndarray, I: np.ndarray, metric: str = "ip") -> np.ndarray:
    """(nq, k) exact scores of ids ``I`` for each query, in exact_search's convention (-1 ids: NaN)."""
    xq = np.asarray(xq, dtype=np.float32)
    x = keys.get(np.where(I < 0, 0, I))  # (nq, k, d)
    s = np.einsum("qd,qkd->qk", xq, x)
    if metric == "l2":
        s = (xq * xq).sum(1)[:, None] - 2 * s + (x * x).sum(2)
    return np.where(I < 0, np.nan, s)


def tie_recall(keys: KeyParts, xq: np.ndarray, I_approx: np.ndarray, D_exact: np.ndarray, I_exact: np.ndarray,
               metric: str = "ip", k: int = 10) -> float:
    """recall@k with ties counted (``recall_at_k``), rescoring the returned ids exactly.

    Two float32 computations of one score differ by rounding, so "as good as" allows 1e-5 of the query's
    squared norm plus the score's size: far below any real difference between neighbours.
    """
    xq = np.asarray(xq, dtype=np.float32)
    tol = 1e-5 * ((xq * xq).sum(1) + np.abs(np.nan_to_num(D_exact[:, min(k, D_exact.shape[1]) - 1], posinf=0, neginf=0)))
    return recall_at_k(I_approx, I_exact, k, true_scores(keys, xq, I_approx[:, :k], metric), D_exact, metric, tol)
