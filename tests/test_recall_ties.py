"""Recall counts ties, and an exact index is never told to become ``--index flat`` (issue 11, item 7: the
recall warning).

A store with repeated chunks has repeated keys: of several ids with the k-th best score, exact search keeps
some and FAISS others. Set recall then fell below 1 on ``IDMap,Flat``, whose results are exact, and the
build warned "consider --index flat" about a flat index.
"""

from __future__ import annotations

import numpy as np
import pytest

from ralm.datastore.index import IndexConfig, build_index
from ralm.datastore.keys import KeyParts, recall_at_k, tie_recall, true_scores


@pytest.fixture
def tied_keys(tmp_path) -> KeyParts:
    """60 distinct unit keys, each stored 25 times (as repeated chunks give), shuffled over two parts."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(60, 16))
    x = np.repeat(base / np.linalg.norm(base, axis=1, keepdims=True), 25, axis=0)[rng.permutation(1500)]
    paths = []
    for i, part in enumerate(np.array_split(x, 2)):
        paths.append(tmp_path / f"part-{i}.npy")
        np.save(paths[-1], part.astype(np.float16))
    return KeyParts(paths)


def test_recall_counts_a_returned_id_tied_with_the_kth_as_a_hit():
    """Item 7: ids 2 and 3 score the same; returning 3 where exact search kept 2 loses nothing."""
    I_exact, D_exact = np.array([[0, 1, 2]]), np.array([[0.9, 0.5, 0.5]])
    I_approx = np.array([[0, 1, 3]])
    assert recall_at_k(I_approx, I_exact, 3) == pytest.approx(2 / 3)  # set recall alone
    tied = np.array([[0.9, 0.5, 0.5]])
    assert recall_at_k(I_approx, I_exact, 3, tied, D_exact) == 1.0
    worse = np.array([[0.9, 0.5, 0.4]])  # a real miss stays a miss
    assert recall_at_k(I_approx, I_exact, 3, worse, D_exact) == pytest.approx(2 / 3)
    # squared L2 distances: smaller is better
    assert recall_at_k(I_approx, I_exact, 3, np.array([[0.1, 0.2, 0.2]]), np.array([[0.1, 0.2, 0.2]]), "l2") == 1.0
    assert recall_at_k(I_approx, I_exact, 3, np.array([[0.1, 0.2, 0.3]]), np.array([[0.1, 0.2, 0.2]]), "l2") \
        == pytest.approx(2 / 3)
    # padding (-1) is never a hit
    assert recall_at_k(np.array([[0, 1, -1]]), I_exact, 3, np.array([[0.9, 0.5, np.nan]]), D_exact) == pytest.approx(2 / 3)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_index_over_repeated_keys_has_recall_one_and_no_warning(tmp_path, tied_keys, metric):
    """Item 7: IDMap,Flat over repeated keys measures recall@10 = 1 and is not advised to use --index flat."""
    logged: list[str] = []
    meta = build_index(tied_keys, np.arange(len(tied_keys)), IndexConfig("flat", metric=metric, n_queries=200),
                       tmp_path / "i.faiss", log=logged.append)
    assert meta["factory"] == "IDMap,Flat"
    assert meta["recall_at_10"] == 1.0
    assert not [m for m in logged if "warning" in m], logged


def test_approximate_index_below_target_is_still_warned_about(tmp_path, tied_keys):
    """Item 7: the warning stays where it is true: an approximate index short of the target recall."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 16)).astype(np.float16)
    np.save(tmp_path / "r.npy", x)
    keys = KeyParts([tmp_path / "r.npy"])
    logged: list[str] = []
    meta = build_index(keys, np.arange(len(keys)), IndexConfig("IVF16,PQ2x4", target_recall=1.0, n_queries=100),
                       tmp_path / "i.faiss", log=logged.append)
    assert meta["recall_at_10"] < 1.0
    assert any("warning" in m and "consider --index flat" in m for m in logged), logged


def test_true_scores_match_exact_search(tied_keys):
    from ralm.datastore.keys import exact_search

    xq = tied_keys.get(np.arange(5))
    for metric in ("ip", "l2"):
        D, I = exact_search(tied_keys, xq, 10, metric=metric)  # noqa: E741
        np.testing.assert_allclose(true_scores(tied_keys, xq, I, metric), D, atol=1e-5)
        assert tie_recall(tied_keys, xq, I, D, I, metric) == 1.0
