"""The knowledge store: the representations of the training examples with their labels (any representation:
an LM's prompt-position state, or a vision backbone's features through a head).

Keys are L2-normalised and searched by inner product (cosine) in an exact in-memory ``faiss.IndexFlatIP``, one
over all rows and one per class (for the demonstrations). The raw representations are kept too: the
demonstrations are weighted sums of them. ``refresh`` replaces the keys (the model changed) and records its
cost. The reference indexes raw features by inner product; normalising keeps one long vector from being
everyone's nearest neighbour.

Leave-self-out: a training example's query passes its own row id in ``exclude`` and that row, and only it, is
dropped from its neighbours (an exact duplicate elsewhere in the store stays).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import faiss
import numpy as np
import torch

from ralm.errors import RalmError


def _normalised(x: torch.Tensor | np.ndarray) -> np.ndarray:
    a = np.array(torch.as_tensor(x).detach().cpu().float().numpy(), dtype=np.float32, order="C")  # (N, d) a copy
    faiss.normalize_L2(a)  # in place (on the copy: the caller's tensor may share memory); zero stays zero
    return a


class KnowledgeStore:
    """``reps`` (N, d) and ``labels`` (N,) class indices in [0, n_classes)."""

    def __init__(self, reps: torch.Tensor | np.ndarray, labels: Sequence[int], n_classes: int,
                 class_names: Sequence[str] | None = None):
        self.labels = np.asarray(labels, dtype=np.int64)  # (N,)
        if self.labels.ndim != 1 or len(self.labels) == 0:
            raise RalmError("knowledge store: needs at least one training example")
        if n_classes < 2 or self.labels.min() < 0 or self.labels.max() >= n_classes:
            raise RalmError(f"knowledge store: labels must be class indices in [0, {n_classes})")
        self.n_classes = n_classes
        self.class_names = tuple(class_names) if class_names is not None else tuple(str(c) for c in range(n_classes))
        self.members = [np.flatnonzero(self.labels == c) for c in range(n_classes)]  # class -> its rows
        self.refreshes, self.refresh_seconds, self.last_refresh_seconds = 0, 0.0, 0.0
        self.refresh(reps)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return self.keys.shape[1]

    def refresh(self, reps: torch.Tensor | np.ndarray) -> float:
        """Replace every key by ``reps`` (N, d), row-aligned with the labels; returns the seconds it took."""
        t0 = time.perf_counter()
        raw = torch.as_tensor(reps).detach().cpu().float()
        if raw.ndim != 2 or raw.shape[0] != len(self.labels):
            raise RalmError(f"knowledge store: refresh needs ({len(self.labels)}, d) representations, got "
                            f"{tuple(raw.shape)}")
        self.raw = raw.clone()  # (N, d) what the demonstrations sum
        self.keys = _normalised(raw)  # (N, d) what is searched
        self.index = faiss.IndexFlatIP(self.dim)
        self.index.add(self.keys)
        self.class_index = []
        for rows in self.members:
            idx = faiss.IndexFlatIP(self.dim)
            idx.add(self.keys[rows])
            self.class_index.append(idx)
        self.last_refresh_seconds = time.perf_counter() - t0
        self.refresh_seconds += self.last_refresh_seconds
        self.refreshes += 1
        return self.last_refresh_seconds

    def search(self, queries: torch.Tensor | np.ndarray, k: int, exclude: Sequence[int] | None = None,
               label: int | None = None, flag: str = "--k") -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` (cosine similarities (Q, k) float32, store row ids (Q, k) int64), best first.

        ``exclude`` (Q,): a row id per query left out of its neighbours (-1: none); ``label``: search that
        class's rows only. ``k`` larger than what is left is refused (``flag`` names the option in the error).
        """
        q = _normalised(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise RalmError(f"knowledge store: queries must be (Q, {self.dim}), got {tuple(q.shape)}")
        rows = np.arange(len(self)) if label is None else self.members[label]
        where = "the knowledge store" if label is None else f"class {self.class_names[label]!r}"
        ex = np.full(len(q), -1, dtype=np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
        if ex.shape != (len(q),):
            raise RalmError(f"knowledge store: exclude needs one row id per query ({len(q)}), got {ex.shape}")
        if len(rows) == 0:
            raise RalmError(f"{flag} {k}: {where} has no examples")
        dropped = np.isin(ex, rows)  # queries whose own row is among the searched ones
        if k < 1 or k > len(rows) - int(dropped.any()):
            left = f"{len(rows)} examples" + (", one left out as the query itself" if dropped.any() else "")
            raise RalmError(f"{flag} {k}: larger than {where} ({left})" if k >= 1 else f"{flag} {k}: must be >= 1")
        index = self.index if label is None else self.class_index[label]
        sims, local = index.search(q, min(k + 1, len(rows)))  # (Q, k+1): one spare for the excluded row
        ids = rows[local]
        keep = ids != ex[:, None]  # the excluded row, only it (a duplicate of it has another id)
        sims_out = np.empty((len(q), k), dtype=np.float32)
        ids_out = np.empty((len(q), k), dtype=np.int64)
        for i in range(len(q)):
            sims_out[i], ids_out[i] = sims[i][keep[i]][:k], ids[i][keep[i]][:k]
        return torch.from_numpy(sims_out), torch.from_numpy(ids_out)
