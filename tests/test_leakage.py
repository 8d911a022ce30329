"""Leakage report: longest common token runs, bytes per target, chunk overlaps, buckets, in-context logging."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from conftest import make_text
from ralm.core.neighbours import NeighbourLog
from ralm.core.targets import Targets, make_targets, summarize
from ralm.data.document import Document
from ralm.eval.leakage import (
    DocScores,
    chunk_overlaps,
    leakage_markdown,
    leakage_report,
    longest_common_substring,
    target_bytes,
)
from ralm.methods.in_context import InContextConfig, Passage, in_context_nll, replug_nll
from ralm.methods.plain import token_nll

# ---------------------------------------------------------------- longest common substring


@pytest.mark.parametrize("a, b, expect", [
    ([], [1, 2, 3], 0),
    ([1, 2, 3], [], 0),
    ([1, 2, 3], [4, 5, 6], 0),
    ([1, 2, 3, 4], [1, 2, 3, 4], 4),  # full copy
    ([9, 1, 2, 3, 9], [7, 7, 1, 2, 3, 8], 3),  # in the middle
    ([1, 2, 5, 1, 2, 3], [0, 1, 2, 3, 0], 3),  # a shorter match first, the longer one later
    ([1, 1, 1, 2], [1, 1, 2, 1, 1, 1], 3),  # repeated tokens
    ([1, 2, 1, 2, 1], [2, 1, 2, 1, 2], 4),
    ([5], [5, 5, 5], 1),
])
def test_lcs_known_cases(a, b, expect):
    assert longest_common_substring(a, b) == expect
    assert longest_common_substring(b, a) == expect
    assert longest_common_substring(np.array(a, dtype=np.int64), torch.tensor(b, dtype=torch.long)) == expect


def _lcs_brute(a, b):
    subs = {tuple(a[i:j]) for i in range(len(a)) for j in range(i + 1, len(a) + 1)}
    return max((j - i for i in range(len(b)) for j in range(i + 1, len(b) + 1) if tuple(b[i:j]) in subs), default=0)


def test_lcs_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randrange(3) for _ in range(rng.randrange(0, 12))]
        b = [rng.randrange(3) for _ in range(rng.randrange(0, 15))]
        assert longest_common_substring(a, b) == _lcs_brute(a, b), (a, b)


# ---------------------------------------------------------------- bytes per target

NON_ASCII = "Café über 東京 — naïve 🙂 river  mountain\tcity.\n"


@pytest.fixture(scope="module")
def lm(tiny_lm):
    return AutoModelForCausalLM.from_pretrained(tiny_lm).eval(), AutoTokenizer.from_pretrained(tiny_lm)


@pytest.fixture(scope="module")
def plain_tok(tiny_tokenizer):
    return AutoTokenizer.from_pretrained(tiny_tokenizer)


def _check_sum(text, tok):
    t = make_targets(Document("x", text, "d"), tok)
    got = target_bytes(text, tok, t)
    assert got.shape == (t.n_targets,) and got.dtype.kind == "i" and (got >= 0).all()
    assert int(got.sum()) == t.scored_bytes
    return t, got


@pytest.mark.parametrize("which", ["bos", "no-bos"])
def test_target_bytes_are_the_token_bytes(which, lm, plain_tok):
    tok = lm[1] if which == "bos" else plain_tok
    assert (tok.bos_token_id is not None) == (which == "bos")
    text = make_text(random.Random(3), 40)
    t, got = _check_sum(text, tok)
    # byte-level BPE on ASCII text: every target owns exactly the bytes its token decodes to
    expect = [len(tok.decode([i]).encode("utf-8")) for i in t.ids[t.first:].tolist()]
    assert got.tolist() == expect
    t, got = _check_sum(NON_ASCII, tok)
    assert t.scored_bytes > len(NON_ASCII)  # the multi-byte characters really are counted in bytes
    if which == "bos":
        assert t.scored_bytes == len(NON_ASCII.encode("utf-8"))


@pytest.mark.parametrize("bos", [True, False])
def test_target_bytes_dropped_whitespace_goes_to_the_next_token(bos):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[BOS]": 1, "alpha": 2, "beta": 3, "gamma": 4, "é": 5}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]", **({"bos_token": "[BOS]"} if bos else {}))
    text = "  alpha  beta gamma é "
    t, got = _check_sum(text, tok)
    # alpha gets the two leading spaces, gamma its space, é its space and the trailing one; beta gets the two
    # before it only with BOS: without, it is the first scored token and the scored text starts at it
    assert got.tolist() == ([2 + 5, 2 + 4] if bos else [4]) + [1 + 5, 1 + 2 + 1]
    with pytest.raises(ValueError, match="targets"):
        target_bytes(text + " beta", tok, t)


# ---------------------------------------------------------------- chunk overlaps


def _targets(n: int, doc_id: str = "d", base: int = 100) -> Targets:
    return Targets(doc_id, torch.tensor([1] + list(range(base, base + n))), 1, scored_bytes=2 * n)


def test_chunk_overlaps_hand_made_log():
    t = _targets(35)  # chunks [1, 17), [17, 33) and a short last one [33, 36)
    ids = t.ids.tolist()
    log = NeighbourLog()
    log.add(1, 9, [[7, 7] + ids[1:9] + [7]])  # copies half of chunk 0
    log.add(9, 17, [ids[5:8], [999]])  # a shorter run in the same chunk does not lower the max
    log.add(17, 25, [ids[17:19], ids[19:21]])  # two 2-runs that are adjacent in the chunk: still 2, not 4
    log.add(25, 33, [])
    log.add(33, 36, [ids[34:36] + [5]])
    got = chunk_overlaps(t, log, chunk_tokens=16)
    assert [(c.start, c.end) for c in got] == [(1, 17), (17, 33), (33, 36)]
    assert [c.overlap for c in got] == [0.5, 2 / 16, 2 / 3]
    assert [c.lcs_tokens for c in got] == [8, 2, 2]
    # a block straddling two chunks gives its neighbours to both
    log.add(15, 19, [ids[17:22]])
    assert [c.overlap for c in chunk_overlaps(t, log, 16)] == [0.5, 5 / 16, 2 / 3]
    assert [c.overlap for c in chunk_overlaps(t, NeighbourLog(), 16)] == [0.0, 0.0, 0.0]
    bad = NeighbourLog()
    bad.add(0, 4, [[1]])  # 0-based target indices instead of indices into ids
    with pytest.raises(ValueError, match="outside"):
        chunk_overlaps(t, bad, 16)


def test_neighbour_log_stores_each_sequence_once():
    log = NeighbourLog()
    for s in range(1, 30, 4):
        log.add(s, s + 4, [[1, 2, 3], np.array([4, 5])])
    log.add(30, 31, [])
    assert len(log) == 9 and len(log.sequences) == 2
    assert list(log)[0] == (1, 5, [(1, 2, 3), (4, 5)]) and list(log)[-1] == (30, 31, [])
    with pytest.raises(ValueError):
        log.add(5, 4, [])


# ---------------------------------------------------------------- report


def _doc(t: Targets, spans: list[tuple[int, int, int]], rng: np.random.Generator) -> DocScores:
    """A document whose chunk starting at target ``s`` has a neighbour copying ``k`` of its tokens."""
    log = NeighbourLog()
    ids = t.ids.tolist()
    for s, e, k in spans:
        log.add(s, e, [[3] + ids[s:s + k] + [3]] if k else [])
    n = t.n_targets
    nb = rng.integers(1, 6, size=n)
    t.scored_bytes = int(nb.sum())
    return DocScores(t, torch.tensor(rng.uniform(0.5, 4, n)), torch.tensor(rng.uniform(0.5, 4, n)), nb, log)


def _synthetic_docs():
    rng = np.random.default_rng(0)
    a = _doc(_targets(24, "a"), [(1, 9, 0), (9, 17, 8), (17, 25, 4)], rng)  # overlaps 0, 1, 0.5
    b = _doc(_targets(20, "b", 300), [(1, 9, 1), (9, 17, 2), (17, 21, 3)], rng)  # 1/8, 2/8, 3/4 (short chunk)
    return [a, b]


def test_leakage_report_buckets_and_totals():
    docs = _synthetic_docs()
    rep = leakage_report(docs, chunk_tokens=8, low_tokens=2, method="in-context")
    json.dumps(rep, allow_nan=False)  # plain JSON
    rows = rep["buckets"]
    assert [r["range"] for r in rows] == ["0", "(0, 0.125]", "(0.125, 0.25]", "(0.25, 0.5]", "(0.5, 0.75]", "(0.75, 1]"]
    assert [r["chunks"] for r in rows] == [1, 1, 1, 1, 1, 1]
    assert [r["tokens"] for r in rows] == [8, 8, 8, 8, 4, 8]
    a, b = docs
    # which chunk went where: the copied chunk of doc a (targets 8..15) is the last bucket
    copy = rows[-1]
    assert copy["bytes"] == int(a.bytes[8:16].sum())
    assert copy["method"]["nll"] == pytest.approx(float(a.nll_method[8:16].mean()))
    assert copy["baseline"]["ppl"] == pytest.approx(math.exp(float(a.nll_baseline[8:16].mean())))
    assert rows[4]["bytes"] == int(b.bytes[16:20].sum())  # 3 of 4 tokens of b's short last chunk
    assert copy["bpb_delta"] == pytest.approx(copy["method"]["bpb"] - copy["baseline"]["bpb"])

    # buckets partition the tokens and bytes, and recombine to the overall figures
    total = rep["all"]
    n_tok = sum(d.targets.n_targets for d in docs)
    n_bytes = sum(d.targets.scored_bytes for d in docs)
    assert sum(r["tokens"] for r in rows) == total["tokens"] == n_tok
    assert sum(r["bytes"] for r in rows) == total["bytes"] == n_bytes
    assert total["chunks"] == 6
    for side, key in (("method", "nll_method"), ("baseline", "nll_baseline")):
        nll_sum = float(sum(getattr(d, key).double().sum() for d in docs))
        ref = summarize(nll_sum, n_tok, n_bytes, 1.0)
        assert total[side]["ppl"] == pytest.approx(ref["ppl"], rel=1e-12)
        assert total[side]["bpb"] == pytest.approx(ref["bpb"], rel=1e-12)
        assert math.exp(sum(r["tokens"] * math.log(r[side]["ppl"]) for r in rows) / n_tok) == pytest.approx(ref["ppl"])
        assert sum(r["bytes"] * r[side]["bpb"] for r in rows) / n_bytes == pytest.approx(ref["bpb"])

    low = rep["low_overlap"]  # longest run <= 2 tokens: the chunks with 0, 1 and 2 copied tokens
    assert (low["chunks"], low["tokens"]) == (3, 24)
    assert low["bytes"] == int(a.bytes[0:8].sum() + b.bytes[0:16].sum())


def test_leakage_report_edges_and_empty_buckets():
    docs = _synthetic_docs()
    rep = leakage_report(docs, chunk_tokens=8, edges=(0.1, 0.3, 1.0))
    assert [r["range"] for r in rep["buckets"]] == ["[0, 0.1]", "(0.1, 0.3]", "(0.3, 1]"]
    assert [r["chunks"] for r in rep["buckets"]] == [1, 2, 3]
    rep = leakage_report(docs, chunk_tokens=8, edges=(0, 0.05, 0.125, 1.0))
    empty = rep["buckets"][1]
    assert empty["chunks"] == 0 and empty["method"]["ppl"] is None and empty["bpb_delta"] is None
    json.dumps(rep, allow_nan=False)
    assert rep["low_overlap"]["chunks"] == 6  # with 8-token chunks every chunk has <= 8 tokens in common
    # b's 4-token tail shares 3 tokens: within 3 tokens, but 3/4 is over the 3/8 allowed a full chunk
    assert leakage_report(docs, chunk_tokens=8, low_tokens=3)["low_overlap"]["chunks"] == 3
    for bad in [(0.0, 0.5), (0.5, 0.25, 1.0), (-0.1, 1.0), ()]:
        with pytest.raises(ValueError, match="edges"):
            leakage_report(docs, chunk_tokens=8, edges=bad)


def test_doc_scores_checks_lengths():
    t = _targets(10)
    with pytest.raises(ValueError, match="nll_method"):
        DocScores(t, torch.zeros(9), torch.zeros(10), np.full(10, 2), NeighbourLog())
    with pytest.raises(ValueError, match="bytes sum"):
        DocScores(t, torch.zeros(10), torch.zeros(10), np.ones(10, dtype=int), NeighbourLog())


def test_leakage_markdown():
    rep = leakage_report(_synthetic_docs(), chunk_tokens=8, edges=(0, 0.05, 0.125, 1.0), method="in-context")
    md = leakage_markdown(rep)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + 4 + 2
    assert "ppl in-context" in lines[0] and "ppl none" in lines[0] and "of 8 tokens" in lines[0]
    assert all(line.count("|") == 10 for line in lines)
    assert lines[3].startswith("| (0, 0.05] | 0 | 0 | 0 | – |")
    assert lines[-2].startswith("| <= 8 tokens | 6 |") and lines[-1].startswith("| all | 6 | 44 |")
    assert f"{rep['all']['bpb_delta']:+.4f}" in lines[-1]


# ---------------------------------------------------------------- in-context RALM with a log


@pytest.fixture(scope="module")
def short_doc(lm):
    t = make_targets(Document("d0", make_text(random.Random(7), 22), "x"), lm[1])
    assert 40 < t.n_targets < 100  # the whole document fits in context as a passage
    return t


def _report(lm, t, retrieve, chunk_tokens=16, docs=1, fn=in_context_nll):
    model, tok = lm
    cfg = InContextConfig(stride=8, query_len=8, doc_tokens=200, docs=docs)
    log = NeighbourLog()
    nll, _ = fn(model, tok, t, retrieve, cfg, 128, log=log)
    assert torch.equal(nll, fn(model, tok, t, retrieve, cfg, 128)[0])  # logging changes nothing
    base = token_nll(model, t, context=128, stride=8)
    nb = np.full(t.n_targets, 1)
    nb[0] = t.scored_bytes - (t.n_targets - 1)
    rep = leakage_report([DocScores(t, nll, base, nb, log)], chunk_tokens=chunk_tokens)
    return log, rep


def test_in_context_log_copy_of_the_document_is_full_overlap(lm, short_doc):
    t = short_doc
    copy = Passage(t.ids[1:].tolist(), 1.0)
    log, rep = _report(lm, t, lambda qs, d: [[copy] for _ in qs])
    starts = list(range(1, len(t.ids), 8))
    assert [(s, e) for s, e, _ in log] == [(s, min(s + 8, len(t.ids))) for s in starts]
    assert list(log)[0][2] == []  # the first block has no query, hence no passage
    assert all(seqs == [tuple(copy.tokens)] for _, _, seqs in list(log)[1:])
    n_chunks = math.ceil(t.n_targets / 16)
    assert rep["buckets"][-1]["chunks"] == n_chunks and rep["all"]["chunks"] == n_chunks
    assert rep["buckets"][-1]["tokens"] == t.n_targets
    assert rep["low_overlap"]["chunks"] == 0
    assert rep["all"]["method"]["ppl"] != rep["all"]["baseline"]["ppl"]


def test_in_context_log_unrelated_passage_is_no_overlap(lm, short_doc):
    t, tok = short_doc, lm[1]
    in_doc = set(t.ids.tolist())
    other = Passage([i for i in range(4, len(tok)) if i not in in_doc][:30], 1.0)  # no token of the document
    assert len(other.tokens) == 30
    log, rep = _report(lm, t, lambda qs, d: [[other] for _ in qs])
    assert len(log) == len(range(1, len(t.ids), 8))
    assert rep["buckets"][0]["range"] == "0" and rep["buckets"][0]["chunks"] == rep["all"]["chunks"]
    assert rep["low_overlap"]["tokens"] == t.n_targets


def test_replug_log_records_each_truncated_passage(lm, short_doc):
    model, tok = lm
    t = short_doc
    a, b, c = Passage(t.ids[1:20].tolist(), 2.0), Passage([5, 6, 7, 8], 0.5), Passage([9, 9], 0.1)
    log = NeighbourLog()
    cfg = InContextConfig(stride=8, docs=2, doc_tokens=10)
    replug_nll(model, tok, t, lambda qs, d: [[a, b, c] for _ in qs], cfg, 128, log=log)
    entries = list(log)
    assert len(entries) == len(range(1, len(t.ids), 8)) and entries[0][2] == []
    assert all(seqs == [tuple(a.tokens[:10]), tuple(b.tokens)] for _, _, seqs in entries[1:])
    # in-context with two passages logs them separately, not as one concatenation
    log2 = NeighbourLog()
    in_context_nll(model, tok, t, lambda qs, d: [[a, b, c] for _ in qs], cfg, 128, log=log2)
    assert [seqs for _, _, seqs in log2] == [seqs for _, _, seqs in entries]
    # a, cut to 10 tokens, is the first 10 targets: the first 16-token chunk overlaps by 10/16
    assert chunk_overlaps(t, log, 16)[0].overlap == 10 / 16
