"""The one retriever interface (issue 12): adapters over both kinds of store answer (D, I) with the stores' own
rows, same-document exclusion refills and pads with -1, and a wrapper changes what every registered method
retrieves (``RandomRetriever``: random store rows, deterministic for a seed; ``FixedRetriever``: the same rows
for every query). ``EmptyRetriever`` through every method is tested in tests/test_registry.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import test_registry as reg
from ralm.core.registry import get_method, method_names
from ralm.core.retriever import (
    EmptyRetriever,
    FixedRetriever,
    KNNRetriever,
    RandomRetriever,
    RetrieverWrapper,
    StoreRetriever,
)
from ralm.datastore.knn_store import KNNStore
from ralm.datastore.store import Datastore
from ralm.errors import IncompatibleError, RalmError

stores = reg.stores  # the registry test's stores: a retrieval store, a kNN-LM store, a RETRO-fit checkpoint
QUERIES = ["alpha beta river", "music ocean", "winter garden stone", "a", "the of and history"]


@pytest.fixture(scope="module")
def ds(stores):
    return Datastore.open(stores[1])


@pytest.fixture(scope="module")
def knn(stores):
    return KNNStore.open(stores[2])


def reference(D_all: np.ndarray, I_all: np.ndarray, doc_of, exclude: list[set[str]], k: int, worst: float):
    """The old ``Datastore.search`` rule on the whole ranking: skip -1 and excluded rows, keep the first k."""
    D, I = np.full((len(I_all), k), worst, np.float32), np.full((len(I_all), k), -1, np.int64)  # noqa: E741
    for q in range(len(I_all)):
        kept = [(d, i) for d, i in zip(D_all[q], I_all[q], strict=True) if i >= 0 and doc_of(i) not in exclude[q]][:k]
        for j, (d, i) in enumerate(kept):
            D[q, j], I[q, j] = d, i
    return D, I


# ---- adapters ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 10])
def test_store_adapter_is_the_stores_own_search(ds, k):
    r = StoreRetriever(ds)
    assert len(r) == len(ds) and r.metric == "ip" and r.rows is None
    D, I = r.search(QUERIES, k)  # noqa: E741
    D_raw, I_raw = ds._raw_search(QUERIES, k)
    np.testing.assert_array_equal(I, I_raw)
    np.testing.assert_array_equal(D, D_raw)
    hits = ds.search(QUERIES, k=k)  # the Hits layer reads the same rows and scores
    assert [[h.row for h in q] for q in hits] == I.tolist()
    assert [[h.score for h in q] for q in hits] == D.astype(float).tolist()


@pytest.mark.parametrize("k", [1, 4, 12])
def test_store_search_with_exclusions_matches_the_filtered_ranking(ds, k):
    """Before/after: the over-fetching row search equals skipping excluded rows in the store's whole ranking,
    which is what ``Datastore.search`` did hit by hit; on the store and on a restricted view."""
    n = len(ds)
    excl = [{"d3", "d7"}, set(), {"d7"}, {"d0", "d1", "d2", "d4", "d5", "d6"}, {"d0"}]
    for store in (ds, ds.restrict(np.arange(0, n, 2))):
        D_all, I_all = store._raw_search(QUERIES, len(store))
        want = reference(D_all, I_all, lambda i, s=store: s.chunk(int(i))["doc_id"], excl, k, -np.inf)
        got = StoreRetriever(store).search(QUERIES, k, exclude_doc_ids=excl)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
        assert [[h.row for h in q] for q in store.search(QUERIES, k=k, exclude_doc_ids=excl)] == \
            [[i for i in row if i >= 0] for row in want[1].tolist()]
        if store is not ds:
            assert np.isin(got[1][got[1] >= 0], store.allowed).all()


def test_exclusion_leaves_fewer_rows_padded_with_minus_one(ds, knn):
    """k more than what is left after the exclusion: the rest are -1 with the worst score of the metric."""
    docs = {ds.chunk(i)["doc_id"] for i in range(len(ds))}
    left = sum(ds.chunk(i)["doc_id"] == "d5" for i in range(len(ds)))
    D, I = StoreRetriever(ds).search(QUERIES[:2], left + 5, exclude_doc_ids=docs - {"d5"})  # noqa: E741
    assert (I[:, :left] >= 0).all() and (I[:, left:] == -1).all() and np.isneginf(D[:, left:]).all()
    assert {ds.chunk(int(i))["doc_id"] for i in I[I >= 0]} == {"d5"}

    xq = knn.keys.get(np.arange(3)).astype(np.float32)
    own = int((knn.docs == 0).sum())
    D, I = KNNRetriever(knn).search(xq, len(knn) - own + 4, exclude_doc_ids="d0")  # noqa: E741
    assert (I[:, :len(knn) - own] >= 0).all() and (I[:, len(knn) - own:] == -1).all()
    assert np.isposinf(D[:, len(knn) - own:]).all() and (knn.docs[I[I >= 0]] != 0).all()


def test_knn_adapter_is_the_stores_own_search_and_refills_after_exclusion(knn):
    r = KNNRetriever(knn)
    xq = knn.keys.get(np.arange(0, 40, 4)).astype(np.float32)
    D, I = r.search(xq, 8)  # noqa: E741
    D_own, I_own = knn.search(xq, 8)
    np.testing.assert_array_equal(I, I_own)
    np.testing.assert_array_equal(D, D_own)
    assert r.metric == "l2" and len(r) == len(knn)
    excl = [{knn.doc_ids[int(knn.docs[i])]} for i in range(0, 40, 4)]  # each query's own document
    D_all, I_all = knn.search(xq, len(knn))
    want = reference(D_all, I_all, lambda i: knn.doc_ids[int(knn.docs[i])], excl, 8, np.inf)
    got = r.search(xq, 8, exclude_doc_ids=excl)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    view = knn.restrict(np.arange(0, len(knn), 3))
    _, I_view = KNNRetriever(view).search(xq, 5)
    assert KNNRetriever(view).rows is view.allowed and np.isin(I_view, view.allowed).all()


# ---- wrappers ----------------------------------------------------------------------------------------
def test_empty_random_and_fixed_edit_only_the_rows(ds, knn):
    base = StoreRetriever(ds)
    D, I = base.search(QUERIES, 4)  # noqa: E741
    D_e, I_e = EmptyRetriever(base).search(QUERIES, 4)
    assert (I_e == -1).all() and np.isneginf(D_e).all() and len(EmptyRetriever(base)) == len(ds)
    _, I_k = EmptyRetriever(KNNRetriever(knn)).search(knn.keys.get(np.arange(2)).astype(np.float32), 3)
    assert I_k.shape == (2, 3) and (I_k == -1).all()

    D_r, I_r = RandomRetriever(base, seed=3).search(QUERIES, 4)
    np.testing.assert_array_equal(D_r, D)  # scores (and so REPLUG's / kNN-LM's weights) kept
    assert (I_r != I).any() and ((I_r >= 0) & (I_r < len(ds))).all()
    np.testing.assert_array_equal(RandomRetriever(base, seed=3).search(QUERIES, 4)[1], I_r)  # same seed, same rows
    assert (RandomRetriever(base, seed=4).search(QUERIES, 4)[1] != I_r).any()

    view = ds.restrict(np.arange(1, len(ds), 5))
    _, I_v = RandomRetriever(StoreRetriever(view), seed=0).search(QUERIES, 3)
    assert np.isin(I_v, view.allowed).all()  # a subset's random rows come from the subset
    few = StoreRetriever(ds).search(QUERIES[:1], 6, exclude_doc_ids={f"d{i}" for i in range(8)} - {"d2"})
    _, I_few = RandomRetriever(base, seed=0).search(QUERIES[:1], 6, exclude_doc_ids={f"d{i}" for i in range(8)} - {"d2"})
    assert ((I_few == -1) == (few[1] == -1)).all()  # a missing neighbour stays missing

    D_f, I_f = FixedRetriever(base, [7, 2]).search(QUERIES, 3)
    assert (I_f[:, :2] == [7, 2]).all() and (I_f[:, 2] == -1).all()
    np.testing.assert_array_equal(D_f[:, :2], D[:, :2])
    assert np.isneginf(D_f[:, 2]).all()


def test_wrappers_refuse_bad_input(ds, knn):
    base = StoreRetriever(ds)
    for r in (base, KNNRetriever(knn), EmptyRetriever(base), RandomRetriever(base)):
        q = QUERIES[:1] if r.metric == "ip" else np.zeros((1, knn.dim), np.float32)
        with pytest.raises(RalmError, match="k=0: must be a positive integer"):
            r.search(q, 0)
    with pytest.raises(RalmError, match=rf"kNN-LM queries of shape \(2, {knn.dim + 1}\): must be an \(nq, {knn.dim}\)"):
        KNNRetriever(knn).search(np.zeros((2, knn.dim + 1), np.float32), 3)
    with pytest.raises(RalmError, match="kNN-LM queries of shape list"):
        KNNRetriever(knn).search(["text"], 3)
    with pytest.raises(IncompatibleError, match="has dim"):
        base.search(np.zeros((1, 3), np.float32), 2)
    with pytest.raises(RalmError, match="exclude_doc_ids has 1 entries for 2 queries"):
        base.search(QUERIES[:2], 2, exclude_doc_ids=[{"d0"}])
    with pytest.raises(RalmError, match="FixedRetriever rows: no rows given"):
        FixedRetriever(base, [])
    with pytest.raises(RalmError, match=rf"FixedRetriever rows \[{len(ds)}\]: not rows this store can return"):
        FixedRetriever(base, [0, len(ds)])
    with pytest.raises(RalmError, match=r"FixedRetriever rows \[0\]"):
        FixedRetriever(StoreRetriever(ds.restrict(np.arange(1, 9))), [0])


# ---- through every registered method -----------------------------------------------------------------
class Recording(RetrieverWrapper):
    """Records the rows every search returned (the rows a method was given)."""

    def __init__(self, inner, seen: list):
        super().__init__(inner)
        self.seen = seen

    def search(self, queries, k, exclude_doc_ids=None):
        D, I = self.inner.search(queries, k, exclude_doc_ids)  # noqa: E741
        self.seen.append(I)
        return D, I


@pytest.mark.parametrize("name", method_names(store="any"))
def test_random_and_fixed_rows_change_what_every_method_retrieves(stores, tiny_lm, name):
    held = stores[0]
    on, _, _ = reg.settings(name, stores)
    stride = reg.STRIDE if get_method(name).options == "in_context" else None
    nearest, rand, again, fixed = [], [], [], []

    def run(wrap):
        return reg._eval(tiny_lm, held, stride, {"wrap_retriever": wrap}, method=name, **on)["ppl"]

    real = run(lambda r: Recording(r, nearest))
    assert real == reg._eval(tiny_lm, held, stride, method=name, **on)["ppl"]  # recording changes nothing
    random_ppl = run(lambda r: Recording(RandomRetriever(r, seed=1), rand))
    assert run(lambda r: Recording(RandomRetriever(r, seed=1), again)) == random_ppl  # deterministic for a seed
    fixed_ppl = run(lambda r: Recording(FixedRetriever(r, [0]), fixed))
    assert nearest and len(rand) == len(nearest) == len(fixed)  # every search went through the wrapper
    n_rows = sum(int((i >= 0).sum()) for i in nearest)
    assert n_rows > 0 and sum(int(((a != b) & (b >= 0)).sum()) for a, b in zip(rand, nearest, strict=True)) > 0.5 * n_rows
    assert all((a == b).all() for a, b in zip(rand, again, strict=True))
    assert all(set(np.unique(i[i >= 0])) <= {0} for i in fixed)
    assert math.isfinite(random_ppl) and random_ppl != real and fixed_ppl != real
