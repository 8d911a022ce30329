"""Exact search shares its work over single-threaded FAISS calls, with FAISS's results whatever the threads.

Issue 11 item 10: on a machine whose cores other processes keep busy, FAISS's multi-threaded BLAS path
spins at hundreds of OpenMP barriers per search (0.06-0.3x plain FAISS at batch 16). Speed is measured by
``benchmarks/search.py`` (idle and contended runs), not here; these tests pin the behaviour that makes it
robust: every FAISS call of a flat search runs on one OpenMP thread, the calls are spread over
``faiss.omp_get_max_threads()`` threads, and the results are FAISS's own, identical for any thread count.
"""

from __future__ import annotations

import contextlib
import threading

import faiss
import numpy as np
import pytest

from ralm.datastore import index as index_mod
from ralm.datastore.index import DenseIndex, blas_always

N, DIM = 20_000, 16  # enough keys for several ranges of FLAT_MIN_ROWS


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, DIM)).astype(np.float32), rng.normal(size=(40, DIM)).astype(np.float32)


def flat(xb: np.ndarray, metric: str) -> DenseIndex:
    inner = faiss.IndexFlatIP(DIM) if metric == "ip" else faiss.IndexFlatL2(DIM)
    index = faiss.IndexIDMap(inner)
    index.add_with_ids(xb, np.arange(len(xb), dtype=np.int64) * 3 + 7)  # ids unlike rows: the map is applied
    return DenseIndex(index, {"metric": metric}, None)


def with_threads(n: int, fn):
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        return fn()
    finally:
        faiss.omp_set_num_threads(old)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("nq,k", [(1, 10), (16, 10), (40, 5000)])  # one query, a batch, k beyond a range
def test_flat_search_is_faiss_search_for_any_thread_count(data, metric, nq, k):
    xb, xq = data
    dense, xq = flat(xb, metric), xq[:nq]
    with blas_always() if nq > 1 else contextlib.nullcontext():  # one plain single-threaded FAISS call
        D_ref, I_ref = with_threads(1, lambda: dense.index.search(xq, k))
    order = np.lexsort((I_ref, -D_ref if metric == "ip" else D_ref), axis=1)  # exact ties by id, as ralm does
    D_ref, I_ref = np.take_along_axis(D_ref, order, 1), np.take_along_axis(I_ref, order, 1)
    runs = [with_threads(t, lambda: dense.search(xq, k)) for t in (1, 2, 3)]
    for D, I in runs:  # bit-identical to FAISS's scores (FAISS on 2 threads differs by ulps at k=5000)
        assert np.array_equal(I, I_ref) and np.array_equal(D, D_ref)
    assert set(np.unique(I_ref)) <= set(np.arange(N) * 3 + 7)


def test_flat_search_runs_single_threaded_faiss_calls_on_a_pool(data, monkeypatch):
    xb, xq = data
    dense = flat(xb, "ip")
    seen: list[tuple[str, int]] = []
    lock = threading.Lock()
    knn = faiss.knn

    def spy(*args, **kwargs):
        with lock:
            seen.append((threading.current_thread().name, faiss.omp_get_max_threads()))
        return knn(*args, **kwargs)

    monkeypatch.setattr(index_mod.faiss, "knn", spy)
    with_threads(2, lambda: dense.search(xq[:16], 10))
    assert len(seen) > 1, "one FAISS call over all keys: its OpenMP team waits at every block for a busy core"
    assert {t for _, t in seen} == {1}  # no OpenMP team inside any call
    assert all(name.startswith("ralm-flat") for name, _ in seen)  # shared by the pool's threads
    seen.clear()
    with_threads(1, lambda: dense.search(xq[:16], 10))  # one thread asked for: no pool
    assert seen and all(name == threading.current_thread().name and t == 1 for name, t in seen)
