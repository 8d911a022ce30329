"""The knowledge store: the representations of the training examples with their labels (any representation:
an LM's prompt-position state, or a vision backbone's features through a head).

Keys are L2-normalised and searched by inner product (cosine) in an exact in-memory ``faiss.IndexFlatIP``, one
over all rows and one per class (for the demonstrations). The raw representations are kept too: the
demonstrations are weighted sums of them. ``refresh`` replaces the keys (the model changed) and records its
cost. The reference indexes raw features by inner product; normalising keeps one long vector from being
everyone's nearest neighbour.

Leave-self-out: a training example's query passes its own row id in ``exclude`` and that row, and only it, is
dropped from its neighbours (an exact duplicate elsewhere in the store stays).

Every search can also go through the one retriever interface (ralm.core.retriever), so ``ralm diagnose``'s
store ablations apply here as to every other method: ``with store.wrapped(wrap):`` each search is answered by
``wrap(KnowledgeRetriever(store, label))``, one per channel (all rows: p_kNN; class c: its demonstrations),
built once on entry. A wrapper's missing neighbours come back as row id -1 (similarity -inf); p_kNN and the
demonstrations read such a row as absent. A wrapper with a payload view (the random-text ablation) swaps the
raw representations the demonstrations sum for the view's while it is on.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import faiss
import numpy as np
import torch

from ralm.core.retriever import Retriever, check_k, payload_store, per_query_exclusions
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
        self._wrapped: dict[int | None, Retriever] | None = None  # channel -> its wrapped retriever (``wrapped``)
        self.random_payload: Callable[[int], torch.Tensor] | None = None  # seed -> (N, d) reps of random text
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
        if self._wrapped is not None:
            self._check_k(k, label, exclude, len(q), flag)
            D, I = self._wrapped[label].search(q, k, _row_exclusions(exclude, len(q)))  # noqa: E741
            return torch.from_numpy(np.asarray(D, dtype=np.float32)), torch.from_numpy(np.asarray(I, dtype=np.int64))
        ex = self._check_k(k, label, exclude, len(q), flag)
        return self._search(q, k, ex, label)

    def _check_k(self, k: int, label: int | None, exclude: Sequence[int] | None, nq: int, flag: str) -> np.ndarray:
        """``exclude`` as (Q,) row ids (-1: none), once ``k`` is known to fit what is searched."""
        rows = np.arange(len(self)) if label is None else self.members[label]
        where = "the knowledge store" if label is None else f"class {self.class_names[label]!r}"
        ex = np.full(nq, -1, dtype=np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
        if ex.shape != (nq,):
            raise RalmError(f"knowledge store: exclude needs one row id per query ({nq}), got {ex.shape}")
        if len(rows) == 0:
            raise RalmError(f"{flag} {k}: {where} has no examples")
        dropped = np.isin(ex, rows)  # queries whose own row is among the searched ones
        if k < 1 or k > len(rows) - int(dropped.any()):
            left = f"{len(rows)} examples" + (", one left out as the query itself" if dropped.any() else "")
            raise RalmError(f"{flag} {k}: larger than {where} ({left})" if k >= 1 else f"{flag} {k}: must be >= 1")
        return ex

    def _search(self, q: np.ndarray, k: int, ex: np.ndarray, label: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact search of normalised queries ``q`` (Q, d), ``ex`` (Q,) the row each leaves out (-1: none)."""
        rows = np.arange(len(self)) if label is None else self.members[label]
        index = self.index if label is None else self.class_index[label]
        sims, local = index.search(q, min(k + 1, len(rows)))  # (Q, k+1): one spare for the excluded row
        ids = rows[local]
        keep = ids != ex[:, None]  # the excluded row, only it (a duplicate of it has another id)
        sims_out = np.empty((len(q), k), dtype=np.float32)
        ids_out = np.empty((len(q), k), dtype=np.int64)
        for i in range(len(q)):
            sims_out[i], ids_out[i] = sims[i][keep[i]][:k], ids[i][keep[i]][:k]
        return torch.from_numpy(sims_out), torch.from_numpy(ids_out)

    @contextlib.contextmanager
    def wrapped(self, wrap: Callable[[Retriever], Retriever]) -> Iterator[None]:
        """Answer every search through ``wrap(KnowledgeRetriever(self, channel))`` while the block runs (module
        docstring); the plain store again afterwards, also after an error."""
        if self._wrapped is not None:
            raise RalmError("knowledge store: already wrapped (nested store ablations)")
        channels: list[int | None] = [None, *range(self.n_classes)]
        wrapped = {c: wrap(KnowledgeRetriever(self, c)) for c in channels}
        raw = self.raw
        view = payload_store(wrapped[None], self)
        try:
            self._wrapped, self.raw = wrapped, view.raw
            yield
        finally:
            self._wrapped, self.raw = None, raw

    def random_text_view(self, seed: int) -> KnowledgeStore:
        """The random-text ablation's payload: this store with the raw representations of random text of each
        example's length (``random_payload``, set by whoever can encode text), labels and keys kept."""
        if self.random_payload is None:
            raise RalmError("random-text ablation: this knowledge store has no random-text encoder (an image run "
                            "has no text: leave random-text out of --ablations)")
        view = copy.copy(self)
        view.raw = torch.as_tensor(self.random_payload(seed)).detach().cpu().float()
        if view.raw.shape != self.raw.shape:
            raise RalmError(f"random-text ablation: {tuple(view.raw.shape)} representations for a "
                            f"{tuple(self.raw.shape)} store")
        return view


def _row_exclusions(exclude: Sequence[int] | None, nq: int) -> list[set[str]] | None:
    """Row ids to leave out (-1: none) as the retriever interface's per-query excluded "document" ids."""
    if exclude is None:
        return None
    return [set() if int(r) < 0 else {str(int(r))} for r in exclude]


class KnowledgeRetriever:
    """The knowledge store (``label`` None: all rows; else that class's) as a ``Retriever`` over global row ids:
    cosine ("ip") scores, a query's excluded "document" ids are the row ids it leaves out (``str(row)``)."""

    metric = "ip"

    def __init__(self, store: KnowledgeStore, label: int | None = None) -> None:
        self.store, self.label, self.channel = store, label, label

    @property
    def rows(self) -> np.ndarray | None:
        return None if self.label is None else self.store.members[self.label]

    def __len__(self) -> int:
        return len(self.store) if self.label is None else len(self.store.members[self.label])

    def search(self, queries: Any, k: int, exclude_doc_ids: Any = None) -> tuple[np.ndarray, np.ndarray]:
        q = _normalised(queries)
        ex = np.full(len(q), -1, dtype=np.int64)
        if exclude_doc_ids is not None:
            for i, e in enumerate(per_query_exclusions(exclude_doc_ids, len(q))):
                if len(e) > 1:
                    raise RalmError("knowledge store: one row left out per query at most")
                ex[i] = int(next(iter(e))) if e else -1
        sims, ids = self.store._search(q, check_k(k), ex, self.label)  # noqa: SLF001 (its own adapter)
        return sims.numpy(), ids.numpy()
