"""Context-variance metrics (issue 15) on hand-made retrieval logs equal their hand-computed values; the
bootstrap covers the truth on synthetic data, is seeded, and pairs units."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ralm.errors import RalmError
from ralm.eval.bootstrap import bootstrap, paired_difference
from ralm.eval.context_variance import (
    context_embeddings,
    context_variance,
    id_distribution,
    mean_cosine_to_mean,
    mean_jaccard,
    query_sensitivity,
)

LOG = [[1, 2, 3], [1, 2, 4], [5, 6, 7], [1, 2, 3]]


def test_mean_jaccard_by_hand():
    # pairs: (0,1) 2/4, (0,2) 0, (0,3) 1, (1,2) 0, (1,3) 2/4, (2,3) 0  -> 2/6
    assert mean_jaccard(LOG) == pytest.approx(2 / 6)
    assert mean_jaccard([[1, 2], [2, 1], [1, 2, -1]]) == 1.0  # order and missing neighbours do not count
    assert mean_jaccard([[], []]) == 1.0 and mean_jaccard([[], [3]]) == 0.0
    big = [[i % 3] for i in range(1000)]  # 3 classes of identical sets: Jaccard = same-class pairs / all pairs
    exact = (3 * math.comb(333, 2) + math.comb(334, 2) - math.comb(333, 2)) / math.comb(1000, 2)
    assert mean_jaccard(big, max_pairs=20_000, seed=1) == pytest.approx(exact, abs=0.02)  # sampled pairs
    with pytest.raises(RalmError, match="needs at least 2"):
        mean_jaccard([[1]])


def test_id_distribution_by_hand():
    # counts: 1:3, 2:3, 3:2, 4:1, 5:1, 6:1, 7:1 of 12 retrievals; 7 distinct; top 1% of 7 -> 1 id (3/12)
    p = np.array([3, 3, 2, 1, 1, 1, 1]) / 12
    h = -(p * np.log(p)).sum()
    d = id_distribution(LOG)
    assert d["distinct_ids"] == 7 and d["top1pct_share"] == pytest.approx(3 / 12)
    assert d["entropy"] == pytest.approx(h / math.log(12))  # spread over at most 12 slots
    assert id_distribution(LOG, store_rows=10)["entropy"] == pytest.approx(h / math.log(10))  # or the store's rows
    same = id_distribution([[9, 9], [9]])
    assert same == {"entropy": 0.0, "distinct_ids": 1, "top1pct_share": 1.0}
    flat = id_distribution([[i] for i in range(200)])  # every retrieval a new id: maximal entropy, top 2 of 200
    assert flat["entropy"] == pytest.approx(1.0) and flat["top1pct_share"] == pytest.approx(2 / 200)
    assert id_distribution([[], [-1]]) == {"entropy": 0.0, "distinct_ids": 0, "top1pct_share": 0.0}


def test_query_sensitivity_and_cosine_by_hand():
    perturbed = [[3, 2, 1], [1, 2, 9], [5, 6, 7], [8]]
    assert query_sensitivity(LOG, perturbed) == 0.5  # inputs 1 and 3 changed their set
    with pytest.raises(RalmError, match="4 inputs against 3"):
        query_sensitivity(LOG, perturbed[:3])
    e = np.array([[1.0, 0.0], [0.0, 2.0]])  # unit rows (1,0), (0,1); mean direction (1,1)/sqrt2
    assert mean_cosine_to_mean(e) == pytest.approx(1 / math.sqrt(2))
    assert mean_cosine_to_mean(np.array([[1.0, 1.0], [3.0, 3.0]])) == pytest.approx(1.0)
    assert mean_cosine_to_mean(np.array([[1.0, 0.0], [-1.0, 0.0]])) == 0.0
    with pytest.raises(RalmError, match="zero vector"):
        mean_cosine_to_mean(np.array([[0.0, 0.0], [1.0, 0.0]]))
    with pytest.raises(RalmError, match="non-empty"):
        mean_cosine_to_mean(np.zeros(3))


def test_context_embeddings_are_the_mean_key_of_each_inputs_rows():
    keys = np.arange(20, dtype=np.float64).reshape(10, 2)  # row r's key: (2r, 2r + 1)
    e = context_embeddings([[1, 3], [2, -1], [9]], lambda rows: keys[rows])
    np.testing.assert_allclose(e, [[4.0, 5.0], [4.0, 5.0], [18.0, 19.0]])
    with pytest.raises(RalmError, match="1 input\\(s\\) retrieved no rows"):
        context_embeddings([[1], [-1, -1]], lambda rows: keys[rows])


def test_context_variance_collects_every_metric():
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    out = context_variance(LOG, embeddings=emb, perturbed=LOG, store_rows=100)
    assert out["inputs"] == 4 and out["mean_jaccard"] == pytest.approx(2 / 6)
    assert out["query_sensitivity"] == 0.0 and out["mean_cosine_to_mean"] == pytest.approx(1 / math.sqrt(2))
    assert set(context_variance(LOG)) == {"inputs", "mean_jaccard", "entropy", "distinct_ids", "top1pct_share"}
    with pytest.raises(RalmError, match="3 rows for 4 inputs"):
        context_variance(LOG, embeddings=emb[:3])


# ---- bootstrap -------------------------------------------------------------------------------------------
def test_bootstrap_covers_the_truth_and_is_seeded():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(100):  # a 90% interval of the mean of 60 N(2, 1) draws covers 2 about 90 times in 100
        ci = bootstrap(rng.normal(2.0, 1.0, size=60), n_boot=400, seed=trial, level=0.9)
        covered += ci.low <= 2.0 <= ci.high
    assert 80 <= covered <= 98
    x = rng.normal(size=30)
    a, b = bootstrap(x, seed=5), bootstrap(x, seed=5)
    assert a == b and bootstrap(x, seed=6) != a and a.estimate == pytest.approx(x.mean())
    assert a.low < a.estimate < a.high


def test_ppl_bootstrap_resamples_documents():
    nll = np.array([10.0, 30.0, 20.0])  # summed NLL (nats) per document
    tokens = np.array([10, 10, 20])
    ci = bootstrap(nll, tokens, kind="ppl", n_boot=2000, seed=0)
    assert ci.estimate == pytest.approx(math.exp(60 / 40))  # token-weighted, not the mean of per-doc ppl
    assert math.exp(1.0) <= ci.low < ci.estimate < ci.high <= math.exp(3.0)  # between the extreme documents
    bpb = bootstrap(nll, np.array([40, 40, 80]), kind="bpb", n_boot=10)
    assert bpb.estimate == pytest.approx(60 / (160 * math.log(2)))
    for bad, match in (((nll, None, "ppl"), "needs weights"), ((nll, tokens, "mean"), "takes no weights"),
                       ((nll, tokens[:2], "ppl"), "3 values but 2 weights"), (([], None, "mean"), "no units"),
                       ((nll, -tokens, "ppl"), "must be positive"), ((nll, tokens, "auc"), "choose from")):
        with pytest.raises(RalmError, match=match):
            bootstrap(*bad)
    with pytest.raises(RalmError, match="--n-boot 0"):
        bootstrap(nll, tokens, kind="ppl", n_boot=0)


def test_paired_difference_pairs_the_units():
    rng = np.random.default_rng(1)
    doc = rng.normal(0, 5, size=40)  # large between-document spread, shared by both conditions
    a, b = doc + 0.3 + rng.normal(0, 0.05, 40), doc
    paired = paired_difference(a, b, seed=0)
    assert paired.estimate == pytest.approx(float(np.mean(a - b)))
    assert paired.excludes_zero() == 1 and paired.low > 0.2  # pairing removes the spread
    assert paired_difference(b, a, seed=0).excludes_zero() == -1
    unpaired = bootstrap(a, seed=0).low - bootstrap(b, seed=0).high
    assert unpaired < 0  # the marginal intervals overlap: only the paired one sees the gain
    with pytest.raises(RalmError, match="40 units against 39"):
        paired_difference(a, b[:39])
