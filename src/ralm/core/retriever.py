"""The retriever seam: every method's retrieval is one ``search`` call on the store it opened.

In-context RALM, REPLUG and RETRO's chunk neighbours call ``Datastore.search(queries, k, exclude_doc_ids)``
(via ``ralm.methods.in_context.store_retriever``); the kNN-LM calls ``KNNStore.search(vectors, k) -> (D, I)``,
the same shape of call over query vectors. ``MethodContext.wrap_store`` is applied by every method to the
store it opened, so one function changes what every method retrieves (store ablations, diagnostics).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Retriever(Protocol):
    """``Datastore.search``'s contract: per query, its hits best first (at most ``k``), none from the documents
    in ``exclude_doc_ids[i]`` for query i. A kNN-LM store answers vector queries with (D, I) arrays instead."""

    def search(self, queries: Any, k: int = ..., exclude_doc_ids: list[set[str]] | None = None) -> Any: ...

    def __len__(self) -> int: ...


class EmptyRetriever:
    """A store that finds nothing: text queries get no hits, vector queries (kNN-LM) get ids -1 (no neighbour).

    Everything else (manifest, chunk records, values) is the wrapped store's, so a method opens as usual.
    """

    def __init__(self, store: Any) -> None:
        self._store = store

    def search(self, queries: Any, k: int = 10, exclude_doc_ids: list[set[str]] | None = None) -> Any:
        if isinstance(queries, np.ndarray):  # kNN-LM: (nq, d) states -> (D, I) of shape (nq, k)
            n = len(queries)
            return np.full((n, k), np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)
        return [[] for _ in queries]

    def restrict(self, rows: np.ndarray) -> EmptyRetriever:
        return EmptyRetriever(self._store.restrict(rows))

    def __len__(self) -> int:
        return len(self._store)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)
