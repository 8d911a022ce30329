"""Sparse BM25 index over chunk texts (bm25s), with the same (D, I) search contract as the dense index."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ralm.errors import RalmError


class BM25Index:
    def __init__(self, retriever, rows: np.ndarray):
        self.retriever, self.rows = retriever, rows

    @property
    def ntotal(self) -> int:
        return len(self.rows)

    def search(self, queries: list[str], k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """D (BM25 scores), I (global row ids) of shape (nq, k); -1 / -inf pad where fewer match.

        ``allowed`` (global rows) restricts the search to a subset: masked documents score 0.
        """
        import bm25s

        kk = min(k, self.ntotal)
        mask = None if allowed is None else np.isin(self.rows, allowed).astype(np.float32)
        tokens = bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
        docs, scores = self.retriever.retrieve(tokens, k=kk, show_progress=False, n_threads=1, weight_mask=mask)
        D = scores.astype(np.float32)
        I = self.rows[docs].astype(np.int64)  # noqa: E741
        I[D <= 0] = -1  # no shared term: not a real hit
        if kk < k:
            D = np.pad(D, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            I = np.pad(I, ((0, 0), (0, k - kk)), constant_values=-1)  # noqa: E741
        return D, I


def build_bm25(texts: list[str], rows: np.ndarray, path: Path) -> dict:
    """Index ``texts`` (global ``rows``) into the folder ``path``, written whole or not at all."""
    import bm25s  # only sparse stores need it (and datastore.store, read at CLI start, imports this module)

    if not texts:
        raise RalmError("no chunks to index: the corpus produced no text")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    retriever.save(str(tmp))
    np.save(tmp / "rows.npy", rows.astype(np.int64))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return {"type": "bm25", "factory": "bm25s", "ntotal": len(rows), "params": {}, "recall_at_10": 1.0}


def load_bm25(path: Path) -> BM25Index:
    import bm25s

    return BM25Index(bm25s.BM25.load(str(path), mmap=True), np.load(path / "rows.npy"))
