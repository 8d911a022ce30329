"""One retriever interface for every method, in FAISS's (D, I) currency.

``Retriever.search(queries, k, exclude_doc_ids=None) -> (D, I)``: per query its k best store rows, best first.

- ``I`` (nq, k) int64: the store's global row ids; -1 where there is no neighbour (the store, or what is left of
  it after the exclusion, is too small), always after the real rows.
- ``D`` (nq, k) float32: scores by the store's ``metric``: ``"ip"`` (inner product, or BM25: larger is better,
  -1 rows hold -inf) or ``"l2"`` (squared distance: smaller is better, -1 rows hold +inf).
- ``queries``: texts (a retrieval store encodes them with its own encoder) or an (nq, d) float array (kNN-LM
  hidden states, or vectors already encoded).
- ``exclude_doc_ids``: one set of document ids per query (or one set, or one id, for all): no row of those
  documents is returned, and the search fetches deeper so each query still gets k rows where the store has them.

A method opens its store, builds the store's adapter (``StoreRetriever`` over ``Datastore.search_rows``,
``KNNRetriever`` over ``KNNStore.search``) and reads every neighbour through it; the payload (chunk text and
tokens, kNN values, doc ids) it reads from the store by row. ``MethodContext.wrap_retriever`` wraps the adapter
of every method, so one wrapper changes what every method retrieves: ``EmptyRetriever`` (nothing),
``RandomRetriever`` (random store rows), ``FixedRetriever`` (the same rows for every query). A wrapper only
edits (D, I); the methods still apply their own rules (same-document exclusion, decontamination) to what it
returns. A wrapper that changes the payload itself (``RandomTextRetriever``, ralm.core.ablations) also
answers ``payload(store)``: the view of the store the method reads the returned rows' records from
(``payload_store``; the plain adapters read the store itself).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from ralm.errors import RalmError

Exclusions = list[set[str] | str | None] | set[str] | frozenset[str] | str | None


class Retriever(Protocol):
    """What every method reads neighbours from (see the module docstring for the contract)."""

    @property
    def metric(self) -> str: ...  # "ip" (larger D is better) or "l2" (smaller D is better)

    @property
    def rows(self) -> np.ndarray | None: ...  # the rows it can return (a subset), None for all of range(len)

    def search(self, queries: Any, k: int,
               exclude_doc_ids: Exclusions = None) -> tuple[np.ndarray, np.ndarray]: ...

    def __len__(self) -> int: ...


def worst(metric: str) -> float:
    """The score of a missing neighbour: -inf for inner products, +inf for distances."""
    return float("inf") if metric == "l2" else float("-inf")


def check_k(k: Any) -> int:
    """``k`` as an int; anything but a positive integer is one error."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise RalmError(f"k={k}: must be a positive integer")
    return int(k)


def per_query_exclusions(exclude: Exclusions, nq: int) -> list[set[str]]:
    """One set of excluded document ids per query (an id or a set applies to every query)."""
    if exclude is None:
        return [set()] * nq
    if isinstance(exclude, str):
        return [{exclude}] * nq
    if isinstance(exclude, (set, frozenset)):
        return [set(exclude)] * nq
    if len(exclude) != nq:
        raise RalmError(f"exclude_doc_ids has {len(exclude)} entries for {nq} queries")
    return [{e} if isinstance(e, str) else set(e or ()) for e in exclude]


def compact(D: np.ndarray, I: np.ndarray, drop: np.ndarray | None, k: int,  # noqa: E741
            metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first ``k`` kept rows of each query in their order (kept: id >= 0 and not ``drop``), padded with -1
    and the worst score; also how many rows each query kept. All in numpy: no per-query Python."""
    keep = I >= 0 if drop is None else (I >= 0) & ~drop
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept rows first, in search order
    kept = np.take_along_axis(keep, order, 1)
    D, I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)  # noqa: E741
    D = np.where(kept, D, np.float32(worst(metric))).astype(D.dtype, copy=False)
    I = np.where(kept, I, -1).astype(np.int64, copy=False)  # noqa: E741
    if I.shape[1] < k:  # fewer rows fetched than asked for
        pad = ((0, 0), (0, k - I.shape[1]))
        D = np.pad(D, pad, constant_values=worst(metric))
        I = np.pad(I, pad, constant_values=-1)  # noqa: E741
    return D, I, keep.sum(axis=1)


def search_excluding(raw: Callable[[int], tuple[np.ndarray, np.ndarray]],
                     dropped: Callable[[np.ndarray], np.ndarray | None], k: int, n: int, excluding: bool,
                     metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(D, I) of the k best rows per query that ``dropped(I)`` does not drop, from ``raw(fetch)`` searches over
    ``n`` rows: with an exclusion it fetches 2k + 16 first, and 4x deeper while a query has fewer than k left."""
    fetch = min(n, 2 * k + 16) if excluding else k
    while True:
        D, I = raw(fetch)  # noqa: E741
        D, I_k, kept = compact(D, I, dropped(I) if excluding else None, k, metric)
        if fetch >= n or bool((kept >= k).all()):
            return D, I_k
        fetch = min(n, fetch * 4)


class _StoreAdapter:
    """A store (or its ``restrict`` view: ``allowed`` rows) seen as a ``Retriever``."""

    def __init__(self, store: Any) -> None:
        self.store = store

    @property
    def rows(self) -> np.ndarray | None:
        return self.store.allowed

    def __len__(self) -> int:
        return len(self.store)


class StoreRetriever(_StoreAdapter):
    """A retrieval ``Datastore`` as a ``Retriever``: its ``search_rows``."""

    @property
    def metric(self) -> str:
        return self.store.metric

    def search(self, queries: Any, k: int, exclude_doc_ids: Exclusions = None) -> tuple[np.ndarray, np.ndarray]:
        return self.store.search_rows(queries, k, exclude_doc_ids)


class KNNRetriever(_StoreAdapter):
    """A kNN-LM ``KNNStore`` as a ``Retriever``: squared-L2 search over LM states.

    Without an exclusion a search is the store's own (D, I), one FAISS call; with one, rows of the excluded
    documents are dropped by their stored document ordinals and the search refills, as for a retrieval store.
    """

    metric = "l2"

    def search(self, queries: Any, k: int, exclude_doc_ids: Exclusions = None) -> tuple[np.ndarray, np.ndarray]:
        k = check_k(k)
        dim = self.store.dim
        if not isinstance(queries, np.ndarray) or queries.ndim != 2 or queries.shape[1] != dim:
            shape = getattr(queries, "shape", type(queries).__name__)
            raise RalmError(f"kNN-LM queries of shape {shape}: must be an (nq, {dim}) array of LM states")
        excl = None if exclude_doc_ids is None else per_query_exclusions(exclude_doc_ids, len(queries))
        if excl is None or not any(excl):  # the kNN-LM's own call (~1000 states, k = 1024): one FAISS search
            return self.store.search(queries, k)
        shared = all(e == excl[0] for e in excl)  # one set for every query: one vectorised test
        ords = [np.array([self.store.ordinal(d) for d in e], dtype=np.int64) for e in (excl[:1] if shared else excl)]

        def dropped(I: np.ndarray) -> np.ndarray:  # noqa: E741
            docs = self.store.docs[np.where(I >= 0, I, 0)]
            if shared:
                return np.isin(docs, ords[0])
            return np.stack([np.isin(docs[q], ords[q]) for q in range(len(docs))])

        return search_excluding(lambda fetch: self.store.search(queries, fetch), dropped, k, len(self.store),
                                True, self.metric)


def payload_store(retriever: Retriever, store: Any) -> Any:
    """The store a method reads the records (chunk tokens and text, kNN values) of ``retriever``'s rows from:
    the wrapper's ``payload(store)`` view where a wrapper in the chain has one, else ``store`` itself."""
    payload = getattr(retriever, "payload", None)
    return store if payload is None else payload(store)


class RetrieverWrapper:
    """A retriever over another one: same store, rows and metric; subclasses edit what ``search`` returns."""

    def __init__(self, inner: Retriever) -> None:
        self.inner = inner

    @property
    def metric(self) -> str:
        return self.inner.metric

    @property
    def rows(self) -> np.ndarray | None:
        return self.inner.rows

    @property
    def channel(self) -> Any:
        """Which of a method's searches this is (None: its only one; ralm.eval.diagnose keeps one log each)."""
        return getattr(self.inner, "channel", None)

    def search(self, queries: Any, k: int, exclude_doc_ids: Exclusions = None) -> tuple[np.ndarray, np.ndarray]:
        return self.inner.search(queries, k, exclude_doc_ids)

    def payload(self, store: Any) -> Any:
        return payload_store(self.inner, store)

    def __len__(self) -> int:
        return len(self.inner)


class EmptyRetriever(RetrieverWrapper):
    """Finds nothing: every query gets k ids -1 (and the worst score), without searching."""

    def search(self, queries: Any, k: int, exclude_doc_ids: Exclusions = None) -> tuple[np.ndarray, np.ndarray]:
        shape = (len(queries), check_k(k))
        return np.full(shape, worst(self.metric), dtype=np.float32), np.full(shape, -1, dtype=np.int64)


class RandomRetriever(RetrieverWrapper):
    """Random store rows instead of the nearest ones, at equal context: each real neighbour's row is replaced
    by a row drawn uniformly (with replacement) from the rows the store can return, its score kept, and a
    missing neighbour stays missing. One generator per wrapper: the same calls in the same order get the same
    rows for a seed."""

    def __init__(self, inner: Retriever, seed: int = 0) -> None:
        super().__init__(inner)
        self._rng = np.random.default_rng(seed)

    def search(self, queries: Any, k: int, exclude_doc_ids: Exclusions = None) -> tuple[np.ndarray, np.ndarray]:
        D, I = self.inner.search(queries, k, exclude_doc_ids)  # noqa: E741
        pos = self._rng.integers(0, len(self.inner), size=I.shape)
        rows = pos if self.rows is None else self.rows[pos]
        return D, np.where(I >= 0, rows, -1)


class FixedRetriever(RetrieverWrapper):
    """The same rows for every query (issue 15's one-fixed-chunk ablation): neighbour j of any query is
    ``rows[j]`` wherever the real search found a j-th neighbour (its score kept), -1 past ``len(rows)``."""

    def __init__(self, inner: Retriever, rows: Sequence[int] | np.ndarray) -> None:
        super().__init__(inner)
        fixed = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(fixed) == 0:
            raise RalmError("FixedRetriever rows: no rows given")
        allowed = self.rows if self.rows is not None else np.arange(len(inner))
        if not np.isin(fixed, allowed).all():
            bad = fixed[~np.isin(fixed, allowed)][:3].tolist()
            raise RalmError(f"FixedRetriever rows {bad}: not rows this store can return")
        self.fixed = fixed

    def search(self, queries: Any, k: int, exclude_doc_ids: Exclusions = None) -> tuple[np.ndarray, np.ndarray]:
        D, I = self.inner.search(queries, k, exclude_doc_ids)  # noqa: E741
        col = np.full(I.shape[1], -1, dtype=np.int64)
        col[: min(len(self.fixed), len(col))] = self.fixed[: len(col)]
        fixed = np.broadcast_to(col, I.shape)
        keep = (I >= 0) & (fixed >= 0)
        return np.where(keep, D, np.float32(worst(self.metric))).astype(D.dtype, copy=False), np.where(keep, fixed, -1)
