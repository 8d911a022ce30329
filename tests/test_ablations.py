"""Store-content ablations (issue 15): each changes exactly what it claims at equal context length. Shuffled:
whole lists move between inputs (never ids within a list), no input gets its own list or set back, across
batch calls, from another document where the method names one; random text: the real rows, read from a view
whose records keep each chunk's token and word counts (so the length distribution of what is handed out is the
real one) with tokens drawn from the store's; and both, like every wrapper, run through every registered
method via ``run_eval_lm(wrap_retriever=)`` and through ``TaskRetrieval``'s ``wrap``.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

import test_registry as reg
import test_tune
from ralm.core.ablations import (
    ABLATIONS,
    RandomTextRetriever,
    RecordingRetriever,
    RetrievalLog,
    Shuffle,
    ShuffledRetriever,
    ablation_wrap,
    derangement,
    fixed_rows,
)
from ralm.core.registry import get_method, method_names
from ralm.core.retriever import KNNRetriever, RetrieverWrapper, StoreRetriever, payload_store
from ralm.data.squad import QAExample
from ralm.datastore.knn_store import KNNStore
from ralm.datastore.store import Datastore
from ralm.errors import RalmError
from ralm.eval.bootstrap import bootstrap, document_units
from ralm.methods.task_inputs import TaskRetrieval

stores = reg.stores
tune_setup = test_tune.setup  # a SQuAD store and a RETRO-fit that reads its neighbours
K = 4


class Toy:
    """A retriever whose rows are a function of the query text: query "q7" -> rows 70..73 (the last one -1
    for odd queries, as when an exclusion leaves too few rows)."""

    metric, rows = "ip", None

    def __len__(self) -> int:
        return 1000

    def search(self, queries, k, exclude_doc_ids=None):
        I = np.array([[10 * int(q[1:]) + j for j in range(k)] for q in queries], dtype=np.int64)  # noqa: E741
        I[[int(q[1:]) % 2 == 1 for q in queries], -1] = -1
        D = np.where(I >= 0, np.float32(1.0), np.float32(-np.inf)) - np.arange(k, dtype=np.float32)
        return D.astype(np.float32), I


def recorded(batches, exclude=None):
    log = RetrievalLog()
    r = RecordingRetriever(Toy(), log)
    for b, qs in enumerate(batches):
        r.search(qs, K, None if exclude is None else exclude[b])
    return log


BATCHES = [[f"q{i}" for i in range(0, 5)], [f"q{i}" for i in range(5, 7)], [f"q{i}" for i in range(7, 12)]]


def test_shuffle_moves_whole_lists_between_inputs_across_batches():
    log = recorded(BATCHES)
    assert len(log) == 12 and log.ids()[1] == [10, 11, 12]
    plan = Shuffle(log, seed=0)
    shuffled = RecordingRetriever(ShuffledRetriever(Toy(), plan), got := RetrievalLog())
    for qs in BATCHES:  # the replay asks in the same batches
        D, I = shuffled.search(qs, K)  # noqa: E741
        assert I.shape == (len(qs), K) and D.shape == (len(qs), K)  # same k
    assert plan.cursor == 12 and plan.unchanged == 0
    own, new = log.I, got.I
    for i in range(12):
        p = int(plan.partner[i])
        assert p != i and set(log.ids()[i]) != set(got.ids()[i])  # never its own list back
        np.testing.assert_array_equal(got.D[i], log.D[i])  # its own scores
        n_own, n_theirs = int((own[i] >= 0).sum()), int((own[p] >= 0).sum())
        assert (new[i] >= 0).tolist() == [j < min(n_own, n_theirs) for j in range(K)]  # its own context length
        theirs = own[p][own[p] >= 0][: int((own[i] >= 0).sum())]
        assert got.ids()[i] == theirs.tolist()  # the partner's list, in its order: not ids shuffled within
    rows_in = Counter(int(x) for r in log.ids() for x in r)
    assert set(Counter(int(x) for r in got.ids() for x in r)) <= set(rows_in)  # only rows the real run retrieved
    again = Shuffle(recorded(BATCHES), seed=0)
    np.testing.assert_array_equal(again.partner, plan.partner)  # seeded
    assert any((Shuffle(recorded(BATCHES), seed=s).partner != plan.partner).any() for s in (1, 2, 3))


def test_shuffle_takes_partners_from_other_documents():
    """Exclusion sets name each query's document: every partner is another document's query."""
    docs = [[{"a"}] * 5, [{"b"}] * 2, [{"c"}] * 5]
    log = recorded(BATCHES, docs)
    for seed in range(5):
        partner = derangement(log, seed)
        assert all(log.groups[i] != log.groups[int(p)] for i, p in enumerate(partner))
        assert sorted(partner.tolist()) == list(range(12))  # a permutation of the inputs


def test_shuffle_keeps_the_same_set_out_when_lists_repeat():
    """Inputs with the same retrieved set (repeated queries) never get one of their twins' lists."""
    log = recorded([["q1", "q1", "q2", "q2", "q3", "q3", "q4"]])
    for seed in range(10):
        plan = Shuffle(log, seed)
        assert plan.unchanged == 0
        assert all(set(log.ids()[i]) != set(log.ids()[int(p)]) for i, p in enumerate(plan.partner))
    same = recorded([["q1", "q1", "q1"]])  # nothing else to give: reported, not hidden
    assert Shuffle(same).unchanged == 3


def test_shuffle_refuses_a_replay_that_is_not_the_recorded_run():
    plan = Shuffle(recorded(BATCHES))
    r = ShuffledRetriever(Toy(), plan)
    with pytest.raises(RalmError, match="query 0 differs from the recorded run's"):
        r.search(["q3"], K)
    with pytest.raises(RalmError, match="asks more than its k=4"):
        r.search(["q0"], K + 1)
    r.search(BATCHES[0] + BATCHES[1] + BATCHES[2], K)
    with pytest.raises(RalmError, match="query 13 of a run that recorded 12"):
        r.search(["q0"], K)
    with pytest.raises(RalmError, match="a derangement needs at least 2"):
        Shuffle(recorded([["q1"]]))
    with pytest.raises(RalmError, match="k=0"):
        ShuffledRetriever(Toy(), Shuffle(recorded(BATCHES))).search(["q0"], 0)


def test_fixed_rows_repeat_the_most_retrieved_row_at_the_real_k():
    log = recorded([["q1", "q2"]])  # rows 10, 11, 12 | 20, 21, 22, 23: all once; the lowest wins the tie
    np.testing.assert_array_equal(fixed_rows(log), [10, 10, 10, 10])
    log.add(["q9"], None, np.zeros((1, 4), np.float32), np.array([[22, 22, -1, -1]]))
    np.testing.assert_array_equal(fixed_rows(log), [22] * 4)
    empty = RetrievalLog()
    empty.add(["q"], None, np.zeros((1, 2), np.float32), np.full((1, 2), -1))
    with pytest.raises(RalmError, match="retrieved no rows"):
        fixed_rows(empty)


def test_shuffle_replays_vector_queries():
    rng = np.random.default_rng(0)
    xq = rng.normal(size=(6, 3)).astype(np.float32)

    class Vec(Toy):
        def search(self, queries, k, exclude_doc_ids=None):
            return super().search([f"q{i}" for i in range(len(queries))], k)

    log = RetrievalLog()
    RecordingRetriever(Vec(), log).search(xq, K)
    plan = Shuffle(log, seed=1)
    _, I = ShuffledRetriever(Vec(), plan).search(xq + 1e-7, K)  # noqa: E741  (float jitter is the same query)
    assert all(I[i][0] == log.I[int(plan.partner[i])][0] for i in range(6))
    with pytest.raises(RalmError, match="differs from the recorded"):
        ShuffledRetriever(Vec(), Shuffle(log)).search(xq + 1.0, K)


# ---- random text ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ds(stores):
    return Datastore.open(stores[1])


def test_random_text_keeps_rows_and_lengths_and_draws_store_tokens(ds):
    base = StoreRetriever(ds)
    queries = ["alpha beta river", "music ocean", "winter garden stone"]
    r = RandomTextRetriever(base, seed=3)
    D, I = base.search(queries, K)  # noqa: E741
    D_t, I_t = r.search(queries, K)
    np.testing.assert_array_equal(I_t, I)  # same rows, same k, same scores: only their payload changes
    np.testing.assert_array_equal(D_t, D)
    view = payload_store(RetrieverWrapper(r), ds)  # found through a chain of wrappers
    assert view is not ds and len(view) == len(ds)
    store_tokens = {t for row in range(len(ds)) for t in ds.chunk(row)["tokens"]}
    store_words = {w for row in range(len(ds)) for w in ds.chunk(row)["text"].split()}
    real_len, fake_len, changed = [], [], 0
    for row in I.reshape(-1).tolist():
        real, fake = ds.chunk(row), view.chunk(row)
        assert fake["doc_id"] == real["doc_id"] and fake["chunk_id"] == real["chunk_id"]  # exclusion rules hold
        assert len(fake["tokens"]) == len(real["tokens"]) and len(fake["continuation"]) == len(real["continuation"])
        assert len(fake["text"].split()) == len(real["text"].split())
        assert set(fake["tokens"]) <= store_tokens and set(fake["text"].split()) <= store_words
        changed += list(fake["tokens"]) != list(real["tokens"])
        real_len.append(len(real["tokens"]) + len(real["continuation"]))
        fake_len.append(len(fake["tokens"]) + len(fake["continuation"]))
        assert view.chunk(row) == fake  # a row reads the same random text every time
    assert sorted(fake_len) == sorted(real_len) and changed == len(real_len)  # the same length distribution
    assert view.hits(D[:1], I[:1])[0][0].text == view.chunk(int(I[0, 0]))["text"]  # the view's own hits
    assert ds.hits(D[:1], I[:1])[0][0].text == ds.chunk(int(I[0, 0]))["text"] != view.chunk(int(I[0, 0]))["text"]
    other = payload_store(RandomTextRetriever(base, seed=4), ds)
    assert other.chunk(int(I[0, 0]))["tokens"] != view.chunk(int(I[0, 0]))["tokens"]
    decoded = payload_store(RandomTextRetriever(base, decode=lambda t: "|".join(map(str, t))), ds)
    rec = decoded.chunk(int(I[0, 0]))
    assert rec["text"] == "|".join(map(str, rec["tokens"]))
    with pytest.raises(RalmError, match="pool_rows=0: must be >= 1"):
        RandomTextRetriever(base, pool_rows=0)


def test_random_text_of_a_knn_store_draws_its_values(stores):
    knn = KNNStore.open(stores[2])
    view = payload_store(RandomTextRetriever(KNNRetriever(knn), seed=0), knn)
    assert view.values.shape == knn.values.shape and (view.values != knn.values).mean() > 0.5
    assert set(np.unique(view.values)) <= set(np.unique(knn.values))  # the store's own next tokens
    np.testing.assert_array_equal(view.docs, knn.docs)  # documents kept: the same-document rule holds


# ---- through every registered method -------------------------------------------------------------------
@pytest.mark.parametrize("name", method_names(store="any"))
def test_every_ablation_through_every_method_at_the_real_k(stores, tiny_lm, name):
    """Each ablation of ``ABLATIONS`` runs through the method via ``run_eval_lm(wrap_retriever=)``; every search
    it makes asks the real run's k and fills as many neighbour slots as the real one (shuffled: no more than
    its partner had), and the per-document NLL it returns gives its ppl back through the bootstrap."""
    held = stores[0]
    on, _, _ = reg.settings(name, stores)
    stride = reg.STRIDE if get_method(name).options == "in_context" else None

    def run(wrap, log):
        per_target: dict = {}
        r = reg._eval(tiny_lm, held, stride, {"wrap_retriever": lambda x: RecordingRetriever(
            x if wrap is None else wrap(x), log), "per_target": per_target}, method=name, **on)
        _, nll, tokens = document_units(per_target)
        assert bootstrap(nll, tokens, kind="ppl", n_boot=20).estimate == pytest.approx(r["ppl"], rel=1e-4)
        return r["ppl"]

    real_log = RetrievalLog()
    real = run(None, real_log)
    found = [int((i >= 0).sum()) for i in real_log.I]
    ppl = {}
    for ablation in ABLATIONS[1:]:
        got = RetrievalLog()
        ppl[ablation] = run(ablation_wrap(ablation, real_log, seed=0), got)
        assert len(got) == len(real_log) and [len(i) for i in got.I] == [len(i) for i in real_log.I]  # same k
        n = [int((i >= 0).sum()) for i in got.I]
        if ablation == "none":
            assert n == [0] * len(n)
        elif ablation == "shuffled":
            assert all(a <= b for a, b in zip(n, found, strict=True))
            assert sum(set(a) != set(b) for a, b in zip(real_log.ids(), got.ids(), strict=True)) >= 0.9 * len(got)
        else:
            assert n == found  # the real context length, query by query
        if ablation == "fixed":
            assert len({r for row in got.ids() for r in row}) == 1
        if ablation == "random-text":
            assert got.ids() == real_log.ids()  # the real rows; their payload is what changed
        assert math.isfinite(ppl[ablation]) and ppl[ablation] != real, ablation
    with pytest.raises(RalmError, match="ablation 'fixed' needs the real run's retrieval log"):
        ablation_wrap("fixed")
    with pytest.raises(RalmError, match="ablation 'empty': choose from real, none"):
        ablation_wrap("empty")
    assert ablation_wrap("real") is None


def test_task_retrieval_wraps_its_searches(ds, tiny_lm):
    examples = [QAExample(f"e{i}", q, ("x",), "", "t", "p") for i, q in
                enumerate(["alpha beta river", "music ocean", "winter garden stone", "the of and history"])]
    plain = TaskRetrieval(ds, docs=3)
    assert plain.store is ds
    log = RetrievalLog()
    real = TaskRetrieval(ds, docs=3, wrap=lambda r: RecordingRetriever(r, log)).rows(examples)
    assert real == plain.rows(examples) and log.ids() == real
    plan = Shuffle(log, seed=0)
    shuffled = TaskRetrieval(ds, docs=3, wrap=lambda r: ShuffledRetriever(r, plan)).rows(examples)
    assert all(set(a) != set(b) for a, b in zip(real, shuffled, strict=True))
    assert sorted(map(tuple, shuffled)) == sorted(map(tuple, real))  # the same lists, moved between examples
    text = TaskRetrieval(ds, docs=3, wrap=lambda r: RandomTextRetriever(r, seed=0))
    assert text.rows(examples) == real and text.store is not ds  # the encoder reads the random-text view
    row = real[0][0]
    assert text.store.chunk(row)["tokens"] != ds.chunk(row)["tokens"]


@pytest.mark.parametrize("arch", ["gpt", "retro"])
def test_ablations_through_a_task_run(tune_setup, tiny_lm, arch):
    """``run_eval_task(wrap_retriever=)``: the examples' chunks are shuffled among them, or read as random
    text by the encoder (both archs), and the loss moves; the real run is the plain one."""
    from ralm.eval.task import EvalTaskConfig, run_eval_task

    _, squad, ds_path, ckpt = tune_setup
    cfg = EvalTaskConfig(zero_shot=True, arch=arch, task="squad", task_file=str(squad), datastore=str(ds_path),
                         model=tiny_lm, split="validation", limit=4, docs=2, doc_tokens=8, max_len=96,
                         max_new_tokens=4, max_target=8, checkpoint=str(ckpt) if arch == "retro" else None)
    log, got = RetrievalLog(), RetrievalLog()
    real = run_eval_task(cfg, wrap_retriever=lambda r: RecordingRetriever(r, log))
    assert real["loss"] == run_eval_task(cfg)["loss"] and len(log) == real["examples"] >= 2
    shuffled = run_eval_task(cfg, wrap_retriever=lambda r: RecordingRetriever(ablation_wrap("shuffled", log)(r), got))
    assert all(set(a) != set(b) for a, b in zip(log.ids(), got.ids(), strict=True))
    text = run_eval_task(cfg, wrap_retriever=ablation_wrap("random-text"))
    assert shuffled["loss"] != real["loss"] and text["loss"] != real["loss"]
