"""Index choice, training, recall tuning and search on clustered (structured) vectors."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from ralm.datastore.index import IndexConfig, build_index, choose_factory, load_index, parse_bytes
from ralm.datastore.keys import KeyParts, exact_search, recall_at_k
from ralm.errors import RalmError


def clustered(n: int, dim: int = 32, centers: int = 50, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres: neighbourhood structure, unlike uniform random vectors."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, dim))
    x = c[rng.integers(0, centers, n)] + 0.35 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


DATA = clustered(6100)  # 6000 stored keys + 100 fresh queries from the same distribution
QUERIES = DATA[6000:]


@pytest.fixture
def keys(tmp_path) -> KeyParts:
    x = DATA[:6000]
    paths = []
    for i, part in enumerate(np.array_split(x, 3)):  # several parts: global rows span them
        paths.append(tmp_path / f"part-{i}.npy")
        np.save(paths[-1], part.astype(np.float16))
    return KeyParts(paths)


def test_auto_choice_follows_size_and_budget():
    small = IndexConfig()
    assert choose_factory(50_000, 384, small)[0] == "IDMap,Flat"
    assert choose_factory(1_000_000, 384, small)[0].endswith(",Flat")  # 1.5 GB fits 4 GB
    factory, rerank = choose_factory(1_000_000, 384, IndexConfig(memory_budget="512MB"))
    assert ",PQ" in factory and rerank > 1
    assert choose_factory(10, 8, IndexConfig(kind="HNSW16"))[0] == "HNSW16"
    assert ",PQ" in choose_factory(50_000, 384, IndexConfig(memory_budget="32MB"))[0]  # small, but over budget


def test_over_budget_index_stays_on_disk_and_reranks_exactly(tmp_path, keys):
    """A memory budget below the fp32 keys: auto builds IVF-PQ, whose lists load memory-mapped (paged in as
    searched, not read into RAM) and whose candidates are re-ranked by exact scores from the fp16 keys."""
    rows = np.arange(len(keys))
    cfg = IndexConfig(memory_budget=f"{len(keys) * keys.dim * 2}B", target_recall=0.9, n_queries=200)
    meta = build_index(keys, rows, cfg, tmp_path / "i.faiss", log=lambda m: None)
    assert ",PQ" in meta["factory"] and meta["rerank"] > 1 and meta["recall_at_10"] >= 0.9
    index = load_index(tmp_path / "i.faiss", meta, keys)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index.index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)  # memory-mapped, not an in-RAM ArrayInvertedLists
    D, I = index.search(QUERIES, 10)  # noqa: E741
    exact = np.einsum("qd,qkd->qk", QUERIES, keys.get(I))  # the returned scores are the keys' exact ones
    np.testing.assert_allclose(D, exact, rtol=1e-4, atol=1e-4)
    _, I_exact = exact_search(keys, QUERIES, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, I_exact, strict=True)]) >= 0.85


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "hnsw"])
def test_build_tunes_to_target_recall_and_writes_metadata(tmp_path, keys, kind):
    rows = np.arange(len(keys))
    meta = build_index(keys, rows, IndexConfig(kind=kind, target_recall=0.9, n_queries=200), tmp_path / "i.faiss",
                       log=lambda m: None)
    assert meta["recall_at_10"] >= 0.9
    assert json.loads((tmp_path / "i.json").read_text())["factory"] == meta["factory"]
    if kind in ("ivf", "ivfpq"):
        assert "nprobe" in meta["params"]
    if kind == "hnsw":
        assert "efSearch" in meta["params"]
    index = load_index(tmp_path / "i.faiss", meta, keys)
    # fresh queries (not stored keys) keep the recall
    xq = QUERIES
    _, I_exact = exact_search(keys, xq, 10)
    D, I = index.search(xq, 10)
    assert recall_at_k(I, I_exact) >= 0.85
    assert np.all(np.diff(D, axis=1) <= 1e-5)  # best first


def test_index_over_subset_of_rows_returns_only_those(tmp_path, keys):
    rows = np.arange(0, len(keys), 2)  # e.g. after dedup
    meta = build_index(keys, rows, IndexConfig(kind="flat"), tmp_path / "i.faiss", log=lambda m: None)
    index = load_index(tmp_path / "i.faiss", meta, keys)
    _, I = index.search(QUERIES[:20], 10)
    assert np.all(I % 2 == 0)
    _, I_exact = exact_search(keys, QUERIES[:20], 10, rows)
    assert recall_at_k(I, I_exact) == 1.0


def test_k_beyond_ntotal_pads(tmp_path, keys):
    rows = np.arange(5)
    meta = build_index(keys, rows, IndexConfig(kind="flat", n_queries=5), tmp_path / "i.faiss", log=lambda m: None)
    D, I = load_index(tmp_path / "i.faiss", meta, keys).search(QUERIES[:2], 8)
    assert I.shape == (2, 8) and np.all(I[:, 5:] == -1) and np.all(np.isinf(D[:, 5:]))


def test_bad_index_config():
    with pytest.raises(RalmError, match="--index"):
        IndexConfig(kind="nonsense")
    with pytest.raises(RalmError, match="--memory-budget"):
        IndexConfig(memory_budget="lots")
    with pytest.raises(RalmError, match="--target-recall"):
        IndexConfig(target_recall=1.5)
    assert parse_bytes("4GB") == 4 * 1024**3 and parse_bytes("512 mb") == 512 * 1024**2


def test_recall_helper():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(exact, exact, 3) == 1.0
    assert recall_at_k(np.array([[1, 9, 9], [4, 5, 9]]), exact, 3) == pytest.approx((1 / 3 + 2 / 3) / 2)


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "hnsw"])
def test_l2_metric_matches_numpy_and_subsets_are_respected(tmp_path, keys, kind):
    """kNN-LM stores search squared L2 (smallest first); a row subset is applied inside the search."""
    rows = np.arange(len(keys))
    scaled = QUERIES * 3.0  # unnormalised queries: L2 and inner-product rankings differ
    meta = build_index(keys, rows, IndexConfig(kind=kind, metric="l2", target_recall=0.9, n_queries=200),
                       tmp_path / "i.faiss", log=lambda m: None)
    assert meta["metric"] == "l2" and meta["recall_at_10"] >= 0.9
    index = load_index(tmp_path / "i.faiss", meta, keys)
    D_np, I_np = exact_search(keys, scaled, 10, metric="l2")
    D, I = index.search(scaled, 10)
    assert np.all(np.diff(D, axis=1) >= -1e-4)  # nearest first
    assert recall_at_k(I, I_np) >= 0.85
    if kind == "flat":
        np.testing.assert_allclose(D, D_np, rtol=1e-4, atol=1e-3)
        assert recall_at_k(I, exact_search(keys, scaled, 10)[1]) < 1.0  # not the inner-product ranking
    allowed = np.sort(np.random.default_rng(1).choice(len(keys), 500, replace=False))
    for xq in (scaled[:1], scaled):  # the single-query path and the batched one
        _, I_sub = index.search(xq, 10, allowed=allowed)
        assert np.isin(I_sub, allowed).all()  # IVF probes more lists for a subset: still k hits
        if kind == "flat":
            assert recall_at_k(I_sub, exact_search(keys, xq, 10, allowed, metric="l2")[1]) == 1.0


def test_subset_smaller_than_k_pads(tmp_path, keys):
    meta = build_index(keys, np.arange(len(keys)), IndexConfig(kind="flat"), tmp_path / "i.faiss", log=lambda m: None)
    D, I = load_index(tmp_path / "i.faiss", meta, keys).search(QUERIES[:3], 8, allowed=np.array([4, 7, 9]))
    assert np.all(np.sort(I[:, :3], axis=1) == [4, 7, 9]) and np.all(I[:, 3:] == -1) and np.all(np.isinf(D[:, 3:]))
    with pytest.raises(RalmError, match="metric"):
        IndexConfig(metric="cosine")
